"""Per-model locks and short-lived model state: eval mode, frozen parameters, forward hooks.

Hooks and ``requires_grad`` flags are properties of a module, shared by every thread that uses
it. Every explanation in this package therefore runs under :func:`model_lock` and leaves the model
exactly as it found it (hooks removed, flags and training mode restored), also when it raises.
A server that runs plain predictions on a model while it is being explained should take the same
lock, or its forward passes would be seen by the explanation's hooks.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

__all__ = [
    "capture_outputs",
    "count_hooks",
    "eval_mode",
    "grads_only_for",
    "model_lock",
]

_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The re-entrant lock that serialises explanation work on ``model`` (one per module object).

    Args:
        model: any module; the lock lives as long as the module does.

    Returns:
        The same ``threading.RLock`` for every call with the same module.
    """
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block and restore each submodule's mode after it."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@contextmanager
def grads_only_for(model: nn.Module, keep: nn.Module | None) -> Iterator[None]:
    """Turn off ``requires_grad`` on every parameter outside ``keep`` for the block.

    Grad-CAM needs the gradient at one layer's output only; pytorch-grad-cam gets it from
    ``loss.backward()``, which would otherwise run the backward pass through the whole network
    and fill every parameter's ``.grad``. With only the target layer's own parameters trainable,
    autograd stops at that layer. pytorch-grad-cam also calls ``model.zero_grad()``, which drops
    every parameter's ``.grad``: flags and gradients are put back afterwards, so a model explained
    between a backward pass and its optimiser step keeps its gradients.
    """
    kept = {id(p) for p in keep.parameters()} if keep is not None else set()
    flags = [(p, p.requires_grad) for p in model.parameters()]
    grads = [p.grad for p in model.parameters()]
    for p, _ in flags:
        # Kept parameters are switched on even in a frozen model: the layer's output needs a
        # gradient for Grad-CAM to read one.
        p.requires_grad_(id(p) in kept)
    try:
        yield
    finally:
        for (p, flag), grad in zip(flags, grads, strict=True):
            p.requires_grad_(flag)
            p.grad = grad


@contextmanager
def capture_outputs(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of the named submodules during the block (detached).

    Args:
        model: the module to hook.
        names: qualified submodule names (``features.block1``); ``KeyError`` style errors from
            ``get_submodule`` surface as ``AttributeError`` before any hook is registered.

    Yields:
        A dict that fills with ``name -> output`` as forward passes run; the hooks are removed
        when the block exits, also on an exception.
    """
    modules = [(name, model.get_submodule(name)) for name in names]
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name, module in modules:

            def hook(_m: nn.Module, _inp: object, out: torch.Tensor, name: str = name) -> None:
                outputs[name] = out.detach()

            handles.append(module.register_forward_hook(hook))
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def count_hooks(model: nn.Module) -> int:
    """Forward, forward-pre and backward hooks registered on ``model`` and its submodules."""
    total = 0
    for module in model.modules():
        for attr in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
        ):
            total += len(getattr(module, attr, {}) or {})
    return total
