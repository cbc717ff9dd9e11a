"""The teacher network: torchvision's DenseNet121 as kdray trains and explains it.

Its own module because torchvision takes about 2 s to import: :mod:`kdray.models` loads it only
when a teacher is built (``kdray.models.TeacherDenseNet`` still names it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import DenseNet

from kdray.input_norm import InputNorm

__all__ = ["TeacherDenseNet"]


class TeacherDenseNet(DenseNet):
    """torchvision's DenseNet121 with input normalisation and no in-place ops.

    torchvision's forward applies ``F.relu(inplace=True)`` after ``features``; here the ReLU is
    out of place so a hook on ``features`` (or ``features.norm5``) sees the real activation.
    """

    def __init__(self, num_classes: int) -> None:
        # The same constructor arguments as torchvision.models.densenet121.
        super().__init__(
            growth_rate=32,
            block_config=(6, 12, 24, 16),
            num_init_features=64,
            num_classes=num_classes,
        )
        self.norm = InputNorm()
        for module in self.modules():
            if isinstance(module, nn.ReLU):
                module.inplace = False

    @property
    def block_names(self) -> list[str]:
        return [
            "features.denseblock1",
            "features.denseblock2",
            "features.denseblock3",
            "features.denseblock4",
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = F.relu(self.features(self.norm(x)))
        out = torch.flatten(F.adaptive_avg_pool2d(features, 1), 1)
        return self.classifier(out)
