from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from kdray.models import (
    ModelSpec,
    StudentCNN,
    build_model,
    count_flops,
    count_params,
    flop_counter,
    init_teacher_weights,
    load_model,
    save_model,
)


def _student(widths=(4, 8, 16, 32, 32)):
    return build_model(ModelSpec(kind="student", num_classes=4, image_size=32, widths=list(widths)))


def test_student_shapes_and_named_blocks():
    model = _student()
    assert isinstance(model, StudentCNN)
    assert model.block_names == [f"features.block{i}" for i in range(1, 6)]
    x = torch.rand(3, 3, 32, 32)
    assert model(x).shape == (3, 4)
    feats = x
    for name in model.block_names:
        block = model.get_submodule(name)
        assert [type(m) for m in block] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d]
        feats = block(feats)
    assert feats.shape == (3, 32, 1, 1)


@pytest.mark.parametrize("depth", [4, 5, 6])
def test_student_depth_follows_widths(depth):
    model = build_model(ModelSpec(kind="student", num_classes=3, image_size=64, widths=[8] * depth))
    assert len(model.block_names) == depth
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 3)


def test_teacher_is_densenet121_without_inplace_relu():
    teacher = build_model(ModelSpec(kind="teacher", num_classes=4, image_size=32))
    assert teacher(torch.rand(2, 3, 32, 32)).shape == (2, 4)
    assert 6_900_000 < count_params(teacher) < 7_100_000  # DenseNet121 with a 4-class head
    assert not any(m.inplace for m in teacher.modules() if isinstance(m, nn.ReLU))
    from torchvision.models import densenet121
    from torchvision.models.densenet import _DenseBlock

    assert isinstance(teacher.get_submodule("features.denseblock4"), _DenseBlock)
    assert count_params(teacher) == count_params(densenet121(num_classes=4))  # the same network
    assert count_params(_student((16, 32, 64, 128, 128))) < count_params(teacher) / 10


def test_save_load_round_trip_without_pickle(tmp_path):
    model = _student().eval()
    spec = ModelSpec(
        kind="student",
        num_classes=4,
        image_size=32,
        widths=[4, 8, 16, 32, 32],
        class_names=list("abcd"),
        dataset="eye_disease",
    )
    save_model(model, spec, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.json", "model.safetensors"]
    loaded, loaded_spec = load_model(tmp_path / "m")
    assert loaded_spec == spec and not loaded.training
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(model(x), loaded(x))


def test_teacher_init_from_a_local_state_dict(tmp_path):
    from torchvision.models import densenet121

    source = densenet121(weights=None)  # stands in for ImageNet weights (no download here)
    torch.save(source.state_dict(), tmp_path / "densenet121.pth")
    teacher = build_model(
        ModelSpec(kind="teacher", num_classes=4, image_size=32),
        teacher_weights=str(tmp_path / "densenet121.pth"),
    )
    assert torch.equal(teacher.features.conv0.weight, source.features.conv0.weight)
    assert teacher.classifier.out_features == 4  # the 1000-class head is replaced


def test_teacher_weights_errors(tmp_path):
    teacher = build_model(ModelSpec(kind="teacher", num_classes=4, image_size=32))
    with pytest.raises(FileNotFoundError, match="teacher.weights"):
        init_teacher_weights(teacher, str(tmp_path / "missing.pth"))
    torch.save(_student().state_dict(), tmp_path / "student.pth")
    with pytest.raises(ValueError, match="not a DenseNet121"):
        init_teacher_weights(teacher, str(tmp_path / "student.pth"))


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown model kind"):
        build_model(ModelSpec(kind="giraffe", num_classes=2, image_size=8))  # type: ignore[arg-type]


def test_counting_flops_leaves_autograd_in_other_threads_alone():
    """Two datasets' pipelines share the driver: one counts FLOPs while another's report takes
    input gradients. torch's FlopCounterMode hooks every module in the process and broke the
    other thread's autograd.grad; kdray's counter does not, and still counts the same."""
    counted = _student([8, 16, 32])
    other = _student([8, 16, 32])
    expected = count_flops(counted, 32)
    errors, stop = [], threading.Event()

    def input_gradients() -> None:
        try:
            while not stop.is_set():
                x = torch.rand(2, 3, 32, 32, requires_grad=True)
                torch.autograd.grad(other(x).sum(), x)
        except Exception as exc:  # noqa: BLE001 - the assertion below reports it
            errors.append(exc)

    thread = threading.Thread(target=input_gradients)
    thread.start()
    try:
        counts = {count_flops(counted, 32) for _ in range(150)}
        with flop_counter() as counter, torch.no_grad():  # only this thread's work is counted
            counted.eval()(torch.zeros(1, 3, 32, 32))
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert counts == {expected}
    assert counter.get_total_flops() == expected
