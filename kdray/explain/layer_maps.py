"""Feature-map visualisation (the paper's KD-FMV): what each conv block responds to.

For each chosen layer the activation (N, C, h, w) is reduced to one map per image, the mean over
channels (or over the ``top_k`` channels with the largest mean activation), upsampled to the input
size and min-max normalised to [0, 1]. Shown from the first block to the last, the maps trace
the decision from edges and texture to the lesion.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kdray.explain.hooks import capture_outputs, eval_mode, model_lock
from kdray.explain.inputs import ImageLike, to_batch

__all__ = ["FeatureMaps", "default_feature_layers", "feature_maps", "reduce_activation"]


@dataclass
class FeatureMaps:
    """Feature maps of a batch.

    Attributes:
        layers: layer names, first to last.
        maps: float32 (N, L, H, W) in [0, 1], one map per image and layer at input size.
        logits: float32 (N, classes) from the same forward pass.
    """

    layers: list[str]
    maps: np.ndarray
    logits: np.ndarray


def default_feature_layers(model: nn.Module) -> list[str]:
    """The model's conv blocks (``block_names``: student blocks, teacher dense blocks).

    Raises:
        ValueError: the model has no ``block_names``; pass layers explicitly.
    """
    names = getattr(model, "block_names", None)
    if not names:
        raise ValueError(f"{type(model).__name__} has no block_names; pass layers=[...] explicitly")
    return list(names)


def _minmax(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each (H, W) map of (N, H, W) to [0, 1]; a constant map becomes 0."""
    flat = maps.flatten(1)
    lo = flat.min(1).values[:, None, None]
    hi = flat.max(1).values[:, None, None]
    span = hi - lo
    out = (maps - lo) / span.clamp_min(1e-12)
    # Constant up to float rounding (e.g. a 1x1 block upsampled): no structure to show.
    flat_map = span <= 1e-5 * torch.maximum(hi.abs(), lo.abs()).clamp_min(1e-12)
    return torch.where(flat_map, torch.zeros_like(out), out)


def reduce_activation(
    activation: torch.Tensor, size: tuple[int, int], top_k: int | None = None
) -> torch.Tensor:
    """(N, C, h, w) activation -> (N, H, W) map in [0, 1] at ``size``.

    Args:
        activation: a layer's output.
        size: (H, W) of the input image.
        top_k: average only the ``top_k`` channels with the largest mean activation per image
            (all channels when None or >= C).

    Raises:
        ValueError: an activation that is not (N, C, h, w).
    """
    if activation.ndim != 4:
        raise ValueError(f"expected a (N, C, h, w) activation, got {tuple(activation.shape)}")
    act = activation.float()
    if top_k is not None and top_k < act.shape[1]:
        strength = act.mean(dim=(2, 3))
        idx = strength.topk(top_k, dim=1).indices
        act = torch.gather(act, 1, idx[:, :, None, None].expand(-1, -1, *act.shape[2:]))
    mean = act.mean(1, keepdim=True)
    up = F.interpolate(mean, size=size, mode="bilinear", align_corners=False)[:, 0]
    return _minmax(up)


def feature_maps(
    model: nn.Module,
    images: ImageLike,
    layers: Sequence[str] | None = None,
    top_k: int | None = None,
) -> FeatureMaps:
    """Channel-mean activation maps of ``layers`` for a batch, in one forward pass.

    Args:
        model: a kdray model (float input in [0, 1]); run in eval mode under its lock.
        images: see :func:`kdray.explain.inputs.to_batch`.
        layers: qualified layer names; default :func:`default_feature_layers`.
        top_k: see :func:`reduce_activation`.

    Returns:
        :class:`FeatureMaps`.
    """
    x = to_batch(images)
    names = list(layers) if layers is not None else default_feature_layers(model)
    size = (x.shape[2], x.shape[3])
    with (
        model_lock(model),
        eval_mode(model),
        torch.no_grad(),
        capture_outputs(model, names) as acts,
    ):
        logits = model(x)
        # ``acts`` is read inside the block: the hooks must not outlive the call.
        maps = torch.stack([reduce_activation(acts[name], size, top_k) for name in names], 1)
    return FeatureMaps(names, maps.cpu().numpy().astype(np.float32), logits.float().cpu().numpy())
