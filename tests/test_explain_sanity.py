"""Sanity checks for saliency maps: the randomisation cascade and the random-logit test."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdray.engine import make_loader, train_epoch
from kdray.explain.agreement import blank_maps
from kdray.explain.gradcam import grad_cam
from kdray.explain.inputs import to_batch
from kdray.explain.sanity import (
    PASS_BELOW,
    parameter_randomisation,
    random_logit,
    random_other_classes,
    randomisation_groups,
    randomised_copies,
    ssim,
)
from kdray.models import ModelSpec, build_model

from conftest import tiny_data

LAYER = "features.block2"


def _student(widths=(8, 16, 16), size=32, classes=4):
    spec = ModelSpec(
        kind="student",
        num_classes=classes,
        image_size=size,
        class_names=[str(i) for i in range(classes)],
        widths=list(widths),
    )
    torch.manual_seed(0)
    return build_model(spec).eval()


@pytest.fixture(scope="module")
def trained():
    """A student trained for a few epochs on the synthetic stand-in, and test images."""
    data = tiny_data("brain_tumor", n_per_class=16, size=32)
    model = _student()
    train = data.splits["train"]
    loader = make_loader((train.images, train.labels), 8, shuffle=True, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(15):
        train_epoch(
            model,
            loader,
            lambda logits, y, _e, _x: {"loss": F.cross_entropy(logits, y)},
            optimizer,
            "cpu",
        )
    model.eval()
    x = to_batch(data.splits["test"].images[:8])
    with torch.no_grad():
        preds = model(x).argmax(1).numpy()
    return model, x, preds


def gradcam(model, x, targets):
    return grad_cam(model, x, LAYER, targets).maps


def edges(model, x, targets):
    """A "saliency" that ignores the network: the input's gradient magnitude."""
    gray = x.mean(1).numpy()
    gy, gx = np.gradient(gray, axis=(1, 2))
    return np.hypot(gx, gy).astype(np.float32)


def test_the_cascade_randomises_its_groups_in_order_and_leaves_the_model_untouched():
    model = _student(widths=(4, 8, 8))
    with torch.no_grad():  # every weight and statistic away from its initial value
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.add_(0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = randomisation_groups(model)
    assert groups == [
        ("head", ["head"]),
        ("block3", ["features.block3"]),
        ("block2", ["features.block2"]),
        ("block1", ["features.block1"]),
    ]

    def owner(key: str) -> str | None:
        return next((n for _, g in groups for n in g if key.startswith(n + ".")), None)

    done: list[str] = []
    for (label, randomised), (_, names) in zip(
        randomised_copies(model, seed=1), groups, strict=True
    ):
        done += names
        assert randomised is not model
        for key, value in randomised.state_dict().items():
            if key.endswith("num_batches_tracked") or key.startswith("norm."):
                continue  # a counter, and the fixed input normalisation
            changed = not torch.equal(value, before[key])
            assert changed == (owner(key) in done), (label, key)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # the original never changes


def test_the_teachers_groups_cover_its_features_once_output_first():
    from kdray.models import ModelSpec

    teacher = build_model(ModelSpec("teacher", 4, 32, ["a", "b", "c", "d"]))
    groups = randomisation_groups(teacher)
    assert [label for label, _ in groups] == [
        "head",
        "denseblock4",
        "denseblock3",
        "denseblock2",
        "denseblock1",
    ]
    assert groups[0][1] == ["classifier"]
    assert groups[1][1] == ["features.transition3", "features.denseblock4", "features.norm5"]
    assert groups[-1][1][:2] == ["features.conv0", "features.norm0"]
    names = [n for _, g in groups[1:] for n in g]
    children = [f"features.{n}" for n, _ in teacher.features.named_children()]
    assert sorted(names) == sorted(children)


def test_a_map_that_ignores_the_weights_fails_and_a_trained_students_gradcam_passes(trained):
    model, x, preds = trained
    edge, cam = parameter_randomisation(
        model, "student", x, {"edges": (edges, len(x)), "gradcam": (gradcam, len(x))}, preds
    )
    assert edge.steps == ["trained", "head", "block3", "block2", "block1"]
    assert edge.rank_correlation == pytest.approx([1.0] * 5)  # the same map at every step
    assert not edge.passed
    assert cam.final < PASS_BELOW and cam.passed, cam
    assert len(cam.rank_correlation) == len(cam.ssim) == len(cam.blank) == 5
    # Grad-CAM at block2 reads block2's activations and the gradient from above: randomising
    # the head alone already changes it
    assert cam.rank_correlation[1] < 0.99


def test_random_logit_tells_a_class_sensitive_map_from_a_class_blind_one(trained):
    model, x, preds = trained
    rho_edges, ssim_edges = random_logit(model, x, edges, preds, 4)
    assert rho_edges == pytest.approx(1.0) and ssim_edges == pytest.approx(1.0)
    rho_cam, _ = random_logit(model, x, gradcam, preds, 4)
    assert rho_cam < rho_edges - 0.2


def test_random_other_classes_never_draw_the_target():
    targets = np.arange(200) % 4
    others = random_other_classes(targets, 4, seed=3)
    assert (others != targets).all() and set(others) == {0, 1, 2, 3}
    with pytest.raises(ValueError):
        random_other_classes(targets, 1)


def test_ssim_and_blank_maps():
    rng = np.random.default_rng(0)
    a = rng.random((3, 16, 16))
    assert ssim(a, a) == pytest.approx(np.ones(3))
    assert ssim(a, 5 * a + 2) == pytest.approx(np.ones(3))  # scale-free: min-max first
    assert (ssim(a, rng.random((3, 16, 16))) < 0.3).all()
    maps = np.stack([np.zeros((8, 8)), np.full((8, 8), 0.3), a[0, :8, :8]])
    assert blank_maps(maps).tolist() == [True, True, False]
