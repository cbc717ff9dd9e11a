"""Training-time augmentation for the teacher: small rotations, shifts, zoom and flips.

Applied per image on the float batch, training split only. Students are trained on the
un-augmented images whose teacher logits are cached, so their soft targets are exact.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms import v2

from kdray.config import AugmentConfig

__all__ = ["build_augment"]


def build_augment(cfg: AugmentConfig) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A batch transform (N, 3, H, W) -> same shape, each image with its own random draw."""
    if not cfg.enabled:
        return None
    steps: list[torch.nn.Module] = []
    if cfg.rotation > 0 or cfg.shift > 0 or cfg.zoom > 0:
        steps.append(
            v2.RandomAffine(
                degrees=cfg.rotation,
                translate=(cfg.shift, cfg.shift) if cfg.shift > 0 else None,
                scale=(1 - cfg.zoom, 1 + cfg.zoom) if cfg.zoom > 0 else None,
            )
        )
    if cfg.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if cfg.vflip:
        steps.append(v2.RandomVerticalFlip())
    if not steps:
        return None
    transform = v2.Compose(steps)

    def apply(batch: torch.Tensor) -> torch.Tensor:
        return torch.stack([transform(image) for image in batch])

    return apply
