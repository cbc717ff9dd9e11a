"""Grad-CAM through pytorch-grad-cam, batched, with hooks that never outlive a call.

pytorch-grad-cam registers its hooks on the target layer of the shared model, so two threads
explaining one model at once would read each other's activations: each call holds the model's
lock. ``GradCAM.__exit__`` swallows ``IndexError`` (and returns nothing); the call re-raises it as
:class:`ExplainError` so a bad target never passes silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from kdray.explain.hooks import eval_mode, grads_only_for, model_lock
from kdray.explain.inputs import ImageLike, to_batch

__all__ = ["CamMaps", "ExplainError", "default_cam_layer", "grad_cam"]


class ExplainError(RuntimeError):
    """An explanation could not be computed (bad target, layer or input)."""


@dataclass
class CamMaps:
    """Grad-CAM maps of a batch.

    Attributes:
        layer: the target layer's name.
        maps: float32 (N, H, W) in [0, 1] at input size (pytorch-grad-cam's min-max scaling).
        targets: int64 (N,) class explained per image.
        logits: float32 (N, classes) from the same forward pass.
    """

    layer: str
    maps: np.ndarray
    targets: np.ndarray
    logits: np.ndarray


def default_cam_layer(model: nn.Module) -> str:
    """The last conv block (student) or last dense block (teacher).

    Raises:
        ValueError: the model has no ``block_names``; pass a layer explicitly.
    """
    names = getattr(model, "block_names", None)
    if not names:
        raise ValueError(f"{type(model).__name__} has no block_names; pass layer=... explicitly")
    return names[-1]


def grad_cam(
    model: nn.Module,
    images: ImageLike,
    layer: str | None = None,
    targets: int | Sequence[int] | np.ndarray | None = None,
) -> CamMaps:
    """Grad-CAM of a batch at one layer.

    Args:
        model: a kdray model; run in eval mode under its lock, left as it was found.
        images: see :func:`kdray.explain.inputs.to_batch`.
        layer: qualified layer name; default :func:`default_cam_layer`.
        targets: class per image (or one for all); None explains the predicted class.

    Returns:
        :class:`CamMaps`.

    Raises:
        ValueError: targets that do not match the batch, or a negative class index.
        ExplainError: a target beyond the model's classes.
    """
    x = to_batch(images)
    name = layer or default_cam_layer(model)
    module = model.get_submodule(name)
    n = x.shape[0]
    cam_targets = None
    if targets is not None:
        tgt = np.atleast_1d(np.asarray(targets, dtype=np.int64))
        tgt = np.repeat(tgt, n) if tgt.size == 1 else tgt
        if tgt.shape != (n,) or (tgt < 0).any():
            raise ValueError(f"need {n} non-negative class indices, got {tgt.tolist()}")
        cam_targets = [ClassifierOutputTarget(int(c)) for c in tgt]
    # A layer without parameters gets its gradient through the input instead.
    has_params = any(True for _ in module.parameters())
    with (
        model_lock(model),
        eval_mode(model),
        torch.enable_grad(),
        grads_only_for(model, module if has_params else None),
        GradCAM(model=model, target_layers=[module]) as cam,
    ):
        cam.compute_input_gradient = not has_params
        try:
            maps = cam(input_tensor=x, targets=cam_targets)
        except IndexError as exc:
            raise ExplainError(f"Grad-CAM failed at {name!r}: {exc}") from exc
        logits = cam.outputs.detach().float()
    picked = logits.argmax(1).numpy() if cam_targets is None else tgt
    return CamMaps(name, np.asarray(maps, dtype=np.float32), picked.astype(np.int64),
                   logits.numpy())
