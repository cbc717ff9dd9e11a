"""SHAP attributions by expected gradients, the method behind ``shap.GradientExplainer``.

``phi(x) = E_{x' ~ background, t ~ U(0, 1)} [grad f_c(x' + t (x - x')) * (x - x')]``, estimated with
``nsamples`` draws per image and summed over colour channels into one signed map per image.

Two engines compute the same estimate from the same random draws:

* ``"torch"`` (default): all images' samples in batches of ``batch_size``, float32, gradients
  with respect to the input only, on a frozen copy of the model with conv + batch-norm pairs
  fused, ReLUs moved after max-pools and channels-last memory (:func:`fast_copy`). It explains
  only the requested class.
* ``"shap"``: ``shap.GradientExplainer`` itself, kept as the reference. Its PyTorch path explains
  every class unless asked otherwise, builds each sample in a Python loop, multiplies in float64
  numpy and reseeds numpy's global random state (so calls are not thread-safe).

Each image's draws (background index, then ``t``, ``nsamples`` times) come from
``numpy.random.RandomState(seed)``: exactly the draws ``shap`` makes for a one-image call with
``rseed=seed``, so both engines agree to float precision, and an image's map does not depend on
the batch it came in.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from kdray.explain.hooks import eval_mode, model_lock
from kdray.explain.inputs import ImageLike, resolve_targets, to_batch

__all__ = ["ShapMaps", "default_batch_size", "draw_samples", "fast_copy", "shap_maps"]

Engine = Literal["torch", "shap"]


@dataclass
class ShapMaps:
    """SHAP attributions of a batch.

    Attributes:
        maps: float32 (N, H, W), signed, summed over channels (positive: evidence for the class).
        values: float32 (N, 3, H, W), per channel.
        targets: int64 (N,) class explained per image.
    """

    maps: np.ndarray
    values: np.ndarray
    targets: np.ndarray


def draw_samples(n_background: int, nsamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Background indices and interpolation points, in the order ``shap`` draws them."""
    rs = np.random.RandomState(seed)
    idx = np.empty(nsamples, np.int64)
    t = np.empty(nsamples, np.float64)
    for k in range(nsamples):
        idx[k] = rs.choice(n_background)
        t[k] = rs.uniform()
    return idx, t


def _simplify(module: nn.Module) -> None:
    """Rewrite every Sequential into a cheaper form of the same function (in place).

    * A BatchNorm2d right after a Conv2d is folded into the convolution (eval mode).
    * A ReLU right before a MaxPool2d moves after it: ``relu(maxpool(x)) == maxpool(relu(x))``
      (ReLU is monotonic), and so is the input gradient up to ties at zero, while the ReLU
      then runs on a tensor four times smaller.
    """
    for child in module.children():
        _simplify(child)
    if not isinstance(module, nn.Sequential):
        return
    mods = module._modules
    names = list(mods)
    for a, b in zip(names, names[1:], strict=False):
        if isinstance(mods[a], nn.Conv2d) and isinstance(mods[b], nn.BatchNorm2d):
            mods[a] = fuse_conv_bn_eval(mods[a], mods[b])
            mods[b] = nn.Identity()
    for a, b in zip(names, names[1:], strict=False):
        if type(mods[a]) is nn.ReLU and type(mods[b]) is nn.MaxPool2d:
            mods[a], mods[b] = mods[b], mods[a]


_COPIES: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, nn.Module]] = weakref.WeakKeyDictionary()


def _state_key(model: nn.Module) -> tuple:
    # Every in-place change of a tensor (optimizer step, load_state_dict) bumps its _version.
    return tuple((id(t), t._version) for t in (*model.parameters(), *model.buffers()))


def fast_copy(model: nn.Module) -> nn.Module:
    """An eval-mode, frozen, simplified, channels-last copy computing the same function.

    Frozen parameters keep autograd to input gradients; :func:`_simplify` removes the
    batch-norm passes and shrinks the ReLUs before max-pools; channels-last suits oneDNN's
    convolutions on CPU. The original model is not touched.
    The copy is cached per model (the caller holds the model's lock) until any of its
    parameters or buffers changes.
    """
    key = _state_key(model)
    cached = _COPIES.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    clone = copy.deepcopy(model).eval()
    _simplify(clone)
    for p in clone.parameters():
        p.requires_grad_(False)
    clone = clone.to(memory_format=torch.channels_last)
    _COPIES[model] = (key, clone)
    return clone


def default_batch_size(pixels: int, total: int, budget_mb: float = 24.0) -> int:
    """Samples per pass: a 16-channel full-resolution activation stays under ~24 MB, and the
    passes are all the same size where a divisor of ``total`` allows it.

    Larger tensors are served by fresh ``mmap`` pages on every allocation (glibc), and the
    page faults and cache misses cost more than the batching saves: on 2 cores at 224x224 the
    student's 50 samples took about 0.45 s in passes of 5-10 and 0.85 s in one pass of 50.
    Equal passes matter for the teacher: every new input shape makes oneDNN build kernels for
    each of DenseNet's 120 convolutions, and too many shapes overflow its kernel cache.

    Args:
        pixels: H * W of the input.
        total: samples to compute (images x ``nsamples``).
        budget_mb: size cap of the largest activation.
    """
    cap = int(max(1, min(total, budget_mb // (16 * pixels * 4 / 2**20))))
    divisor = max(d for d in range(1, cap + 1) if total % d == 0)
    return divisor if 2 * divisor >= cap else cap


def _torch_engine(
    model: nn.Module,
    x: torch.Tensor,
    background: torch.Tensor,
    targets: np.ndarray,
    nsamples: int,
    batch_size: int,
    seed: int,
) -> np.ndarray:
    n = x.shape[0]
    idx, t = draw_samples(background.shape[0], nsamples, seed)
    device = x.device  # the model's (an audit actor on a GPU moves its images there)
    image_of = torch.arange(n).repeat_interleave(nsamples).to(device)
    bg_of = torch.from_numpy(np.tile(idx, n)).to(device)
    t_of = torch.from_numpy(np.tile(t, n)).float()[:, None, None, None].to(device)
    target_of = torch.from_numpy(targets).to(device)[image_of]
    phi = torch.zeros_like(x)
    for start in range(0, n * nsamples, batch_size):
        sl = slice(start, start + batch_size)
        xi, xb = x[image_of[sl]], background[bg_of[sl]]
        inp = (t_of[sl] * xi + (1 - t_of[sl]) * xb).contiguous(memory_format=torch.channels_last)
        inp.requires_grad_(True)
        score = model(inp).gather(1, target_of[sl, None]).sum()
        (grad,) = torch.autograd.grad(score, inp)
        phi.index_add_(0, image_of[sl], grad * (xi - xb))
    return (phi / nsamples).cpu().numpy()


class _ClassScore(nn.Module):
    """The logit of one class as a (N, 1) output, so shap explains that class only."""

    def __init__(self, model: nn.Module, cls: int) -> None:
        super().__init__()
        self.model = model
        self.cls = cls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[:, self.cls : self.cls + 1]


def _shap_engine(
    model: nn.Module,
    x: torch.Tensor,
    background: torch.Tensor,
    targets: np.ndarray,
    nsamples: int,
    batch_size: int,
    seed: int,
) -> np.ndarray:
    import shap  # slow import (pandas, numba); only the reference engine needs it

    out = np.zeros(tuple(x.shape), np.float32)
    for cls in np.unique(targets):
        explainer = shap.GradientExplainer(
            _ClassScore(model, int(cls)), background, batch_size=batch_size
        )
        for j in np.flatnonzero(targets == cls):
            values = explainer.shap_values(x[j : j + 1], nsamples=nsamples, rseed=seed)
            out[j] = np.asarray(values)[0, ..., 0]
    return out


def shap_maps(
    model: nn.Module,
    images: ImageLike,
    background: ImageLike,
    targets: int | Sequence[int] | np.ndarray | None = None,
    nsamples: int = 50,
    batch_size: int | None = None,
    seed: int = 0,
    engine: Engine = "torch",
) -> ShapMaps:
    """Expected-gradients SHAP values of a batch for one class per image.

    Args:
        model: a kdray model; the torch engine works on :func:`fast_copy` of it.
        images: see :func:`kdray.explain.inputs.to_batch`.
        background: images of the same size (see :mod:`kdray.explain.background`).
        targets: class per image (or one for all); None explains the predicted class.
        nsamples: draws per image (``ExplainConfig.shap_nsamples``).
        batch_size: samples per forward/backward pass; default :func:`default_batch_size`.
        seed: seeds the draws; the same seed gives the same map.
        engine: ``"torch"`` or ``"shap"`` (the reference; slower).

    Returns:
        :class:`ShapMaps`.

    Raises:
        ValueError: an unknown engine, or a background whose image size differs.
    """
    if engine not in ("torch", "shap"):
        raise ValueError(f"unknown SHAP engine {engine!r}; expected 'torch' or 'shap'")
    x = to_batch(images)
    bg = to_batch(background).to(x.device)
    if bg.shape[1:] != x.shape[1:]:
        raise ValueError(
            f"background images {tuple(bg.shape[1:])} differ from input {tuple(x.shape[1:])}"
        )
    batch = batch_size or default_batch_size(x.shape[2] * x.shape[3], x.shape[0] * nsamples)
    with model_lock(model), eval_mode(model):
        tgt = resolve_targets(model, x, targets)
        if engine == "torch":
            work = fast_copy(model)
            with torch.enable_grad():
                values = _torch_engine(work, x, bg, tgt, nsamples, batch, seed)
        else:
            values = _shap_engine(model, x, bg, tgt, nsamples, batch, seed)
    values = values.astype(np.float32)
    return ShapMaps(values.sum(1), values, tgt)
