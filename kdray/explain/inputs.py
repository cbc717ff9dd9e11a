"""Turning what callers hold (uint8 arrays, float tensors, one image or a batch) into model input."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["ImageLike", "display_images", "to_batch", "resolve_targets"]

ImageLike = np.ndarray | torch.Tensor


def to_batch(images: ImageLike) -> torch.Tensor:
    """Images -> float32 (N, 3, H, W) in [0, 1], the models' input.

    Args:
        images: one image or a batch; uint8 (0..255) or float (0..1); channels first
            ((3, H, W), (N, 3, H, W)) or last ((H, W, 3), (N, H, W, 3)); a 2-D (H, W) or single
            channel image is repeated to three channels.

    Returns:
        A new float32 tensor (the caller's array is never modified).

    Raises:
        ValueError: a shape that is not an image or a batch of images.
    """
    x = torch.as_tensor(np.asarray(images) if isinstance(images, np.ndarray) else images)
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.detach().float().clone()
    if x.ndim == 2:
        x = x[None, None]
    elif x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"expected an image or a batch of images, got shape {tuple(images.shape)}")
    if x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise ValueError(f"expected 1 or 3 channels, got shape {tuple(images.shape)}")
    return x.contiguous()


def display_images(x: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) model input -> float32 (N, H, W, 3) in [0, 1] for drawing."""
    return x.detach().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)


def resolve_targets(
    model: nn.Module, x: torch.Tensor, targets: int | Sequence[int] | np.ndarray | None
) -> np.ndarray:
    """Class index per image: the given one(s), else the model's prediction.

    Raises:
        ValueError: a list of targets whose length is not the batch size.
    """
    n = x.shape[0]
    if targets is None:
        with torch.no_grad():
            return model(x).argmax(1).cpu().numpy().astype(np.int64)
    out = np.atleast_1d(np.asarray(targets, dtype=np.int64))
    if out.size == 1:
        out = np.repeat(out, n)
    if out.shape != (n,):
        raise ValueError(f"{out.size} targets for {n} images")
    return out
