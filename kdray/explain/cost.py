"""What a model and its explanations cost: parameters, FLOPs, execution time."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from kdray import models
from kdray.explain.hooks import eval_mode, model_lock
from kdray.models import count_params

__all__ = ["count_flops", "count_params", "time_call"]


def count_flops(model: nn.Module, size: int, backward: bool = False) -> int:
    """FLOPs of one forward pass on a (1, 3, size, size) image, counted by PyTorch.

    ``torch.utils.flop_counter.FlopCounterMode`` counts matmuls and convolutions (a
    multiply-add is 2 FLOPs); element-wise ops (BN, ReLU, pooling) are not counted.

    Args:
        model: any image model.
        size: input side.
        backward: add the backward pass with respect to the input only (no parameter
            gradients), as one SHAP sample costs.
    """
    if not backward:
        with model_lock(model):
            return models.count_flops(model, size)
    x = torch.zeros(1, 3, size, size, requires_grad=True)
    with model_lock(model), eval_mode(model), models.flop_counter() as counter:
        flags = [(p, p.requires_grad) for p in model.parameters()]
        try:
            for p, _ in flags:
                p.requires_grad_(False)
            torch.autograd.grad(model(x)[:, 0].sum(), x)
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
    return int(counter.get_total_flops())


def time_call(fn: Callable[[], object], repeats: int = 1, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times
