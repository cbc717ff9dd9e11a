"""Faithfulness of explanation maps as numbers.

* Localisation against lesion masks: the pointing game (is the map's peak inside the mask?) and
  energy in mask (share of the map's positive mass inside the mask). Images with an empty mask
  (healthy classes) score NaN and are left out of means.
* Deletion / insertion (Petsiuk et al., RISE, 2018): pixels are replaced, most attributed
  first, by a blurred copy of the image (deletion) or revealed on top of it (insertion), and the
  probability of the explained class is traced; the area under that curve is low for deletion
  and high for insertion when a map points at what the model uses.

Every score comes with a random-map baseline: smooth random fields (coarse noise upsampled
bilinearly, like a CAM), so a method is compared with maps of the same smoothness.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kdray.explain.agreement import blank_maps
from kdray.explain.hooks import eval_mode, model_lock
from kdray.explain.inputs import ImageLike, to_batch

__all__ = [
    "DeletionInsertion",
    "deletion_insertion",
    "energy_in_mask",
    "nanmean",
    "pointing_game",
    "random_maps",
]


def _check(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    maps = np.asarray(maps, dtype=np.float32)
    masks = np.asarray(masks, dtype=bool)
    if maps.shape != masks.shape or maps.ndim != 3:
        raise ValueError(f"maps {maps.shape} and masks {masks.shape} must both be (N, H, W)")
    return maps, masks


def pointing_game(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """1.0 where the map's maximum lies inside the mask, 0.0 outside, NaN for empty masks.

    A coarse map upsampled to the input (a 2x2 Grad-CAM at 64x64) has a flat top covering many
    pixels, and ``argmax`` would always pick its first pixel in raster order (an image corner).
    When the maximum is shared, the score is the share of the tied pixels inside the mask: the
    expected hit of a random tie-break. A constant map (a blank Grad-CAM: zero everywhere)
    points nowhere and scores 0, a miss, not the mask's share of the image.

    Args:
        maps: (N, H, W) maps; larger means more relevant.
        masks: (N, H, W) bool lesion masks.

    Returns:
        float (N,) in [0, 1].
    """
    maps, masks = _check(maps, masks)
    flat = maps.reshape(len(maps), -1).astype(np.float64)
    top = flat.max(1, keepdims=True)
    spread = top - flat.min(1, keepdims=True)
    tied = flat >= top - 1e-6 * np.maximum(spread, 1e-12)
    inside = masks.reshape(len(masks), -1)
    hit = (tied & inside).sum(1) / tied.sum(1)
    hit[blank_maps(maps)] = 0.0  # constant: a miss
    hit[~masks.any(axis=(1, 2))] = np.nan
    return hit


def energy_in_mask(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Share of the map's positive mass inside the mask; NaN for empty masks; 0 for a map with
    no positive mass (a blank Grad-CAM), a miss.

    Returns:
        float (N,) in [0, 1].
    """
    maps, masks = _check(maps, masks)
    pos = np.clip(maps, 0.0, None).astype(np.float64)
    total = pos.sum(axis=(1, 2))
    inside = (pos * masks).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        share = inside / total
    share[total <= 0] = 0.0
    share[~masks.any(axis=(1, 2))] = np.nan
    return share


def nanmean(values: np.ndarray) -> float:
    """Mean over the finite entries (NaN when there are none), without a warning."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def random_maps(n: int, size: tuple[int, int], seed: int = 0, cells: int = 7) -> np.ndarray:
    """Smooth random maps in [0, 1]: uniform noise on a ``cells`` x ``cells`` grid, upsampled.

    Returns:
        float32 (n, H, W).
    """
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, cells, cells, generator=gen)
    up = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)[:, 0]
    return up.numpy().astype(np.float32)


@dataclass
class DeletionInsertion:
    """Deletion / insertion results for a batch.

    Attributes:
        deletion: (N,) area under the deletion curve (lower is more faithful).
        insertion: (N,) area under the insertion curve (higher is more faithful).
        fractions: (S,) share of pixels replaced at each step, 0 .. 1.
        deletion_curves: (N, S) class probability along deletion.
        insertion_curves: (N, S) class probability along insertion.
    """

    deletion: np.ndarray
    insertion: np.ndarray
    fractions: np.ndarray
    deletion_curves: np.ndarray
    insertion_curves: np.ndarray


def _baseline(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x).contiguous()
    from torchvision.transforms.functional import gaussian_blur  # torchvision: about 1.4 s

    sigma = max(1.0, x.shape[-1] / 10.0)
    k = min(int(2 * np.ceil(3 * sigma) + 1), 2 * (min(x.shape[-2:]) // 2) - 1)
    return gaussian_blur(x, [k, k], [sigma, sigma])


def deletion_insertion(
    model: nn.Module,
    images: ImageLike,
    maps: np.ndarray,
    targets: np.ndarray,
    steps: int = 12,
    baseline: Literal["blur", "mean"] = "blur",
    batch_size: int = 128,
    seed: int = 0,
) -> DeletionInsertion:
    """Deletion and insertion curves and their areas.

    Pixels are ranked by map value (ties broken at random with ``seed``); at step ``s`` of
    ``steps`` the top ``s / steps`` share of pixels is replaced by the baseline image (deletion)
    or shown over it (insertion). Each curve point is the softmax probability of the target.

    Args:
        model: a kdray model (run in eval mode, no gradients).
        images: (N, ...) batch, see :func:`kdray.explain.inputs.to_batch`.
        maps: (N, H, W) maps at input size.
        targets: (N,) class per image.
        steps: curve resolution (``steps + 1`` points from 0 to 1).
        baseline: ``blur`` (Gaussian, sigma = side / 10) or ``mean`` (per-channel image mean).
        batch_size: images per forward pass.
        seed: tie-breaking seed.

    Returns:
        :class:`DeletionInsertion`.

    Raises:
        ValueError: maps, targets and images that do not match.
    """
    if baseline not in ("blur", "mean"):
        raise ValueError(f"unknown baseline {baseline!r}; expected 'blur' or 'mean'")
    x = to_batch(images)
    n, _, h, w = x.shape
    maps = np.asarray(maps, dtype=np.float32)
    targets = np.asarray(targets, dtype=np.int64)
    if maps.shape != (n, h, w) or targets.shape != (n,):
        raise ValueError(
            f"maps {maps.shape} / targets {targets.shape} do not match images {tuple(x.shape)}"
        )
    base = _baseline(x, baseline)
    fractions = np.linspace(0.0, 1.0, steps + 1)
    counts = np.round(fractions * h * w).astype(np.int64)
    rng = np.random.default_rng(seed)
    # rank[i, p] = position of pixel p in image i's order (0 = most attributed)
    order = np.stack([np.lexsort((rng.random(h * w), -m.ravel())) for m in maps])
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(h * w)[None].repeat(n, 0), axis=1)
    rank_t = torch.from_numpy(rank.reshape(n, 1, 1, h, w))
    keep = rank_t < torch.from_numpy(counts).view(1, -1, 1, 1, 1)  # (N, S, 1, H, W) replaced
    curves = np.zeros((2, n, steps + 1))
    per_image = 2 * (steps + 1)  # deletion then insertion steps of one image
    chunk = max(1, batch_size // per_image)  # whole images per forward pass
    with model_lock(model), eval_mode(model), torch.no_grad():
        for start in range(0, n, chunk):
            idx = range(start, min(n, start + chunk))
            batch = torch.cat(
                [
                    torch.cat(
                        [torch.where(keep[i], base[i], x[i]), torch.where(keep[i], x[i], base[i])]
                    )
                    for i in idx
                ]
            )
            probs = torch.softmax(model(batch).float(), 1).view(len(idx), per_image, -1)
            for j, i in enumerate(idx):
                p = probs[j, :, targets[i]].numpy()
                curves[0, i], curves[1, i] = p[: steps + 1], p[steps + 1 :]
    auc = np.trapezoid(curves, fractions, axis=2)
    return DeletionInsertion(auc[0], auc[1], fractions, curves[0], curves[1])
