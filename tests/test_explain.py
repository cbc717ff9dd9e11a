"""Explanation methods on the teacher and the student: shapes, ranges, hooks, threads, SHAP."""

from __future__ import annotations

import base64
import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from kdray.explain import (
    Explainer,
    ExplainError,
    Explanation,
    explain,
    feature_maps,
    grad_cam,
    model_lock,
    save_background,
    select_background,
    shap_maps,
)
from kdray.explain.expected_gradients import fast_copy
from kdray.explain.gradcam import default_cam_layer, layer_output_size
from kdray.explain.hooks import count_hooks
from kdray.models import ModelSpec, StudentCNN, TeacherDenseNet, build_model, save_model

SIZE = 32


def _randomise_bn(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial batch-norm statistics, so fusing conv + BN is really exercised."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) * 0.4 - 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def student() -> StudentCNN:
    torch.manual_seed(0)
    return _randomise_bn(StudentCNN(4, [8, 16, 16]), 1)


@pytest.fixture(scope="module")
def teacher() -> TeacherDenseNet:
    torch.manual_seed(0)
    return _randomise_bn(TeacherDenseNet(4), 2)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (8, 3, SIZE, SIZE), dtype=np.uint8)


def _params_state(model: nn.Module) -> list[bool]:
    return [p.requires_grad for p in model.parameters()]


def _assert_untouched(model: nn.Module, training: bool = False) -> None:
    assert count_hooks(model) == 0
    assert all(_params_state(model))
    assert all(p.grad is None for p in model.parameters())
    assert all(m.training == training for m in model.modules())


@pytest.mark.parametrize(
    ("kind", "size", "expected"),
    [
        ("student", 32, "features.block2"),
        ("student", 64, "features.block3"),
        ("student", 224, "features.block5"),
        ("teacher", 32, "features.denseblock1"),
        ("teacher", 64, "features.denseblock2"),
        ("teacher", 224, "features.denseblock4"),
    ],
)
def test_default_cam_layer_is_the_deepest_block_of_at_least_7x7(
    kind: str, size: int, expected: str
) -> None:
    spec = ModelSpec(kind=kind, num_classes=4, image_size=size, widths=[16, 32, 64, 128, 128])
    model = build_model(spec)
    assert default_cam_layer(model, size) == expected
    assert default_cam_layer(model) == model.block_names[-1]  # no size: the last block
    side = min(layer_output_size(model, expected, size))
    assert side >= 7 or expected == model.block_names[0]
    deeper = model.block_names[model.block_names.index(expected) + 1 :]
    assert all(min(layer_output_size(model, name, size)) < 7 for name in deeper)


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_methods_shapes_and_ranges(
    which: str, request: pytest.FixtureRequest, images: np.ndarray
) -> None:
    model = request.getfixturevalue(which)
    x = images[:2]
    fm = feature_maps(model, x)
    assert fm.layers == model.block_names
    assert fm.maps.shape == (2, len(model.block_names), SIZE, SIZE)
    assert fm.maps.min() >= 0.0 and fm.maps.max() <= 1.0 + 1e-6
    assert fm.logits.shape == (2, 4)
    top = feature_maps(model, x, layers=model.block_names[:1], top_k=2)
    assert top.maps.shape == (2, 1, SIZE, SIZE)

    cam = grad_cam(model, x)
    assert cam.layer == default_cam_layer(model, SIZE) != model.block_names[-1]  # 32 px: not 1x1
    assert cam.maps.shape == (2, SIZE, SIZE) and cam.maps.dtype == np.float32
    assert cam.maps.min() >= 0.0 and cam.maps.max() <= 1.0 + 1e-6
    np.testing.assert_array_equal(cam.targets, fm.logits.argmax(1))
    given = grad_cam(model, x, layer=model.block_names[-2], targets=[1, 2])
    np.testing.assert_array_equal(given.targets, [1, 2])

    bg = images[4:6]
    sh = shap_maps(model, x, bg, nsamples=4)
    assert sh.maps.shape == (2, SIZE, SIZE) and sh.values.shape == (2, 3, SIZE, SIZE)
    assert np.isfinite(sh.maps).all() and np.abs(sh.maps).max() > 0
    np.testing.assert_allclose(sh.maps, sh.values.sum(1), rtol=1e-5, atol=1e-8)
    _assert_untouched(model)


def test_explain_result_and_json(student: StudentCNN, images: np.ndarray) -> None:
    names = ["glioma", "meningioma", "notumor", "pituitary"]
    image_hwc = images[0].transpose(1, 2, 0)  # channels-last uint8 is accepted too
    e = explain(student, image_hwc, background=images[4:8], class_names=names)
    assert set(e.methods) == {"feature_maps", "gradcam", "shap"}
    assert e.class_name == names[e.prediction] and e.target == e.prediction
    assert abs(sum(e.probabilities) - 1.0) < 1e-5 and e.image_size == (SIZE, SIZE)
    assert len(e.methods["feature_maps"].maps) == len(student.block_names)
    assert e.methods["shap"].signed and not e.methods["gradcam"].signed
    for result in e.methods.values():
        assert result.time_ms > 0
        for layer_map in result.maps:
            assert layer_map.array.shape == (SIZE, SIZE)
            assert Image.open(io.BytesIO(layer_map.png)).size == (SIZE, SIZE)

    text = e.to_json()
    assert '"array"' not in text
    assert json.loads(text) == e.to_dict()
    data = Explanation.model_validate_json(text)
    png = base64.b64decode(json.loads(text)["methods"]["gradcam"]["maps"][0]["png"])
    assert Image.open(io.BytesIO(png)).mode == "RGB"
    assert data.methods["gradcam"].maps[0].png == e.methods["gradcam"].maps[0].png
    full = Explanation.model_validate_json(e.to_json(include_arrays=True))
    np.testing.assert_allclose(
        full.methods["gradcam"].maps[0].array, e.methods["gradcam"].maps[0].array, rtol=1e-6
    )

    only = explain(student, images[0], methods=["gradcam"], target=3)
    assert set(only.methods) == {"gradcam"} and only.target == 3
    with pytest.raises(ValueError, match="unknown explanation method"):
        explain(student, images[0], methods=["lime"])
    with pytest.raises(ValueError, match="background"):
        explain(student, images[0], methods=["shap"])
    _assert_untouched(student)


def test_gradcam_keeps_the_gradients_it_found(student: StudentCNN, images: np.ndarray) -> None:
    """pytorch-grad-cam zeroes every .grad; a model explained mid-training keeps its own."""
    for i, p in enumerate(student.parameters()):
        p.grad = torch.full_like(p, float(i + 1))
    before = [p.grad.clone() for p in student.parameters()]
    try:
        explain(student, images[0], methods=["gradcam"])
        after = [p.grad for p in student.parameters()]
        assert all(a is not None and torch.equal(a, b) for a, b in zip(after, before, strict=True))
    finally:
        for p in student.parameters():
            p.grad = None


def test_hooks_released_after_errors(student: StudentCNN, images: np.ndarray) -> None:
    student.train()  # the caller's mode must come back too
    try:
        with pytest.raises(ExplainError):
            grad_cam(student, images[:2], targets=[0, 99])  # pytorch-grad-cam swallows IndexError
        _assert_untouched(student, training=True)

        original = student.head.forward

        def broken(x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

        student.head.forward = broken
        try:
            for call in (
                lambda: feature_maps(student, images[:1]),
                lambda: grad_cam(student, images[:1]),
                lambda: explain(student, images[0], methods=["feature_maps"]),
            ):
                with pytest.raises(RuntimeError, match="boom"):
                    call()
                _assert_untouched(student, training=True)
        finally:
            student.head.forward = original
        with pytest.raises(AttributeError):
            feature_maps(student, images[:1], layers=["features.nope"])
        _assert_untouched(student, training=True)
    finally:
        student.eval()
    # the lock was released on every path
    got = []

    def probe() -> None:
        lock = model_lock(student)
        got.append(lock.acquire(timeout=5))
        if got[-1]:
            lock.release()

    t = threading.Thread(target=probe)
    t.start()
    t.join()
    assert got == [True]


def test_gradcam_on_a_frozen_model(student: StudentCNN, images: np.ndarray) -> None:
    reference = grad_cam(student, images[:2]).maps
    for p in student.parameters():
        p.requires_grad_(False)
    try:
        np.testing.assert_allclose(grad_cam(student, images[:2]).maps, reference, atol=1e-6)
        assert not any(_params_state(student))
        # a layer without parameters gets its gradient through the input
        relu = grad_cam(student, images[:2], layer="features.block3.relu")
        assert relu.maps.shape == (2, SIZE, SIZE) and relu.maps.max() > 0
        assert count_hooks(student) == 0 and not any(_params_state(student))
    finally:
        for p in student.parameters():
            p.requires_grad_(True)


def test_threads_match_serial(student: StudentCNN, images: np.ndarray) -> None:
    bg = images[:4]

    def run(i: int) -> tuple[np.ndarray, ...]:
        e = explain(student, images[i], background=bg)
        return tuple(r.maps[-1].array for r in e.methods.values())

    serial = [run(i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        parallel = list(pool.map(run, range(8)))
    for a, b in zip(serial, parallel, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    assert count_hooks(student) == 0


def test_shap_engine_matches_shap_library(student: StudentCNN, images: np.ndarray) -> None:
    x, bg = images[:3], images[3:7]
    ours = shap_maps(student, x, bg, targets=[0, 2, 2], nsamples=12, seed=5)
    ref = shap_maps(student, x, bg, targets=[0, 2, 2], nsamples=12, seed=5, engine="shap")
    scale = np.abs(ref.values).max()
    np.testing.assert_allclose(ours.values, ref.values, atol=1e-4 * scale)
    # the same draws per image: a map does not depend on the batch it came in
    alone = shap_maps(student, x[1:2], bg, targets=[2], nsamples=12, seed=5)
    np.testing.assert_allclose(alone.values[0], ours.values[1], atol=1e-6 * scale)
    # expected gradients: attributions sum to f(x) - E[f(background)] as samples grow
    many = shap_maps(student, x[:1], bg, targets=[0], nsamples=400, seed=0)
    with torch.no_grad():
        xs = torch.from_numpy(x[:1]).float() / 255
        gap = student(xs)[0, 0] - student(torch.from_numpy(bg).float() / 255)[:, 0].mean()
    assert abs(many.values.sum() - float(gap)) < 0.25 * abs(float(gap)) + 1e-3
    with pytest.raises(ValueError, match="engine"):
        shap_maps(student, x, bg, engine="deep")  # type: ignore[arg-type]


def test_background_and_explainer_from_dir(
    tmp_path, student: StudentCNN, images: np.ndarray
) -> None:
    labels = np.array([0, 0, 0, 1, 1, 2, 3, 3])
    bg = select_background(images, labels, 4, seed=1)
    assert bg.shape == (4, 3, SIZE, SIZE)
    picked = [i for i in range(8) if any((images[i] == b).all() for b in bg)]
    assert sorted(labels[picked].tolist()) == [0, 1, 2, 3]  # one per class first
    np.testing.assert_array_equal(bg, select_background(images, labels, 4, seed=1))

    spec = ModelSpec(
        kind="student", num_classes=4, image_size=SIZE, class_names=list("abcd"), widths=[8, 16, 16]
    )
    save_model(student, spec, tmp_path)
    save_background(tmp_path, bg)
    explainer = Explainer.from_dir(tmp_path)
    assert explainer.methods == ["feature_maps", "gradcam", "shap"]
    e = explainer.explain(images[0])
    assert e.class_name in list("abcd") and "shap" in e.methods


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_fast_copy_computes_the_same_function(
    which: str, request: pytest.FixtureRequest, images: np.ndarray
) -> None:
    model = request.getfixturevalue(which)
    fast = fast_copy(model)
    assert fast is fast_copy(model)  # cached while the weights do not change
    if which == "student":  # batch norms folded into the convolutions
        assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    x = torch.from_numpy(images[:2]).float() / 255

    def logits_and_grad(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        xi = x.clone().requires_grad_(True)
        out = m(xi)
        (grad,) = torch.autograd.grad(out[:, 1].sum(), xi)
        return out.detach(), grad

    ref_out, ref_grad = logits_and_grad(model)
    out, grad = logits_and_grad(fast)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-3, atol=1e-3 * float(ref_grad.abs().max()))
    model.zero_grad(set_to_none=True)
    _assert_untouched(model)
    with torch.no_grad():
        p = next(model.parameters())
        p.add_(0.0)  # an in-place update bumps the version: the copy is rebuilt
    assert fast_copy(model) is not fast
