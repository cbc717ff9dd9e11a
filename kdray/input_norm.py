"""The input normalisation both networks start with: ImageNet statistics, inside the model.

Its own module so that :mod:`kdray.models` (the student) and :mod:`kdray.densenet` (the
teacher) share it without importing each other: ``kdray.models`` imports ``kdray.densenet``
(lazily, for torchvision's import time), never the other way round.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "InputNorm"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class InputNorm(nn.Module):
    """(x - mean) / std with ImageNet statistics, so an ImageNet-initialised teacher fits."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
