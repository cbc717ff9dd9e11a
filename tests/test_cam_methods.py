"""CAM variants: kdray's batched torch form against pytorch-grad-cam's own classes, on a trained
student and an untrained teacher, every variant at several layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdray.explain.cam_methods import CAM_METHODS, check_method, combine
from kdray.explain.gradcam import ExplainError, grad_cam, layer_cams
from kdray.explain.hooks import count_hooks
from kdray.models import ModelSpec, StudentCNN, build_model


@pytest.fixture(scope="module")
def student_and_images():
    from conftest import tiny_data

    data = tiny_data("brain_tumor", n_per_class=6, size=32)
    torch.manual_seed(0)
    model = StudentCNN(4, [6, 8, 8, 8]).eval()
    # A few steps of training: gradients of mixed sign, as in a real model.
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    x = torch.from_numpy(data.splits["train"].images).float() / 255
    y = torch.from_numpy(data.splits["train"].labels)
    model.train()
    for _ in range(20):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    return model, data.splits["test"].images


@pytest.mark.parametrize("method", CAM_METHODS)
def test_batched_variants_equal_pytorch_grad_cams_own(method, student_and_images):
    model, images = student_and_images
    layers = ["features.block1", "features.block2", "features.block3"]
    maps, targets, logits = layer_cams(model, images, layers, method)
    assert (targets == logits.argmax(1)).all()
    for layer in layers:
        ref = grad_cam(model, images, layer, None, method)
        assert np.abs(maps[layer] - ref.maps).max() < 1e-4, (method, layer)
        assert (ref.targets == targets).all()
    # An explicit class, the same in both.
    other = (targets + 1) % 4
    maps, _, _ = layer_cams(model, images, ["features.block2"], method, other)
    ref = grad_cam(model, images, "features.block2", other, method)
    assert np.abs(maps["features.block2"] - ref.maps).max() < 1e-4
    assert count_hooks(model) == 0 and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("method", ["gradcam", "hirescam"])
def test_batched_variants_on_the_teacher(method):
    torch.manual_seed(0)
    teacher = build_model(ModelSpec("teacher", 4, 32)).eval()
    x = np.random.default_rng(0).integers(0, 255, (3, 3, 32, 32), dtype=np.uint8)
    layers = ["features.denseblock1", "features.denseblock2"]
    maps, _, _ = layer_cams(teacher, x, layers, method)
    for layer in layers:
        assert np.abs(maps[layer] - grad_cam(teacher, x, layer, None, method).maps).max() < 1e-4


def test_positive_only_variants_never_blank_where_gradcam_can():
    """A layer whose class gradient is negative on average but positive somewhere: Grad-CAM's
    averaged weights blank the map, LayerCAM keeps the positive part, HiResCAM the positions
    whose contribution is positive."""
    a = torch.ones(1, 1, 2, 2)
    g = torch.tensor([[[[1.0, -3.0], [-3.0, -3.0]]]])
    assert combine("gradcam", a, g).max() == 0  # blank
    assert combine("layercam", a, g)[0, 0, 0] == 1 and combine("layercam", a, g).sum() == 1
    assert combine("hirescam", a, g)[0, 0, 0] == 1 and combine("hirescam", a, g).sum() == 1


def test_unknown_variant_and_bad_target_are_named():
    with pytest.raises(ValueError, match="eigencam"):
        check_method("eigencam")
    model = StudentCNN(4, [4, 4]).eval()
    with pytest.raises(ExplainError, match="beyond"):
        layer_cams(model, np.zeros((1, 3, 16, 16), np.uint8), ["features.block1"], "gradcam", 7)
