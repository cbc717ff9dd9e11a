"""Does the student stand in for the teacher? Agreement of their predictions and explanations.

The paper's premise is that the distilled student is the transparent stand-in for the teacher.
That holds only as far as the two decide alike and explain the same image alike:

* prediction agreement: share of images where the student's label is the teacher's;
* per explanation method, for each image, the agreement of the teacher's and the student's
  maps: Spearman rank correlation over pixels, and the overlap (intersection over union) of
  their top-``fraction`` pixels.

Each map agreement is reported beside the same score between the teacher's map and a random
map of the same smoothness (:func:`kdray.explain.faithfulness.random_maps`): agreement above
that is agreement a random explanation would not have.
"""

from __future__ import annotations

import numpy as np

__all__ = ["TOP_FRACTION", "blank_maps", "prediction_agreement", "rank_correlation", "top_overlap"]


TOP_FRACTION = 0.1  # the top-pixel overlap the reports and the audit use: each map's top 10 %


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"maps {a.shape} and {b.shape} must both be (N, H, W)")
    return a.reshape(len(a), -1), b.reshape(len(b), -1)


def prediction_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of positions where the two label arrays agree.

    Raises:
        ValueError: different lengths, or none.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(
            f"label arrays {a.shape} and {b.shape} must have one equal, non-zero length"
        )
    return float((a == b).mean())


def blank_maps(maps: np.ndarray) -> np.ndarray:
    """True for each map (a row of ``maps``, any shape after the first axis) with no variation:
    zero everywhere (a blank Grad-CAM), or any constant."""
    flat = np.asarray(maps, dtype=np.float64).reshape(len(maps), -1)
    return np.ptp(flat, axis=1) <= 1e-12 * np.maximum(np.abs(flat).max(1), 1.0)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks (1-based) of each row, ties given their average rank: ``scipy.stats.rankdata(x,
    axis=1)``'s default, without importing scipy.stats (0.8 s, paid by every audit actor)."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, axis=1, kind="mergesort")
    ranks = np.empty_like(x)
    for i in range(len(x)):
        s = x[i, order[i]]
        new = np.r_[True, s[1:] != s[:-1]]
        dense = np.cumsum(new)  # 1-based group of each sorted value
        ends = np.r_[np.flatnonzero(new), len(s)]  # group g spans sorted positions ends[g-1]..
        ranks[i, order[i]] = 0.5 * (ends[dense] + ends[dense - 1] + 1)
    return ranks


def rank_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rank correlation of each pair of maps over their pixels (ties: average ranks).

    Args:
        a, b: (N, H, W) maps of the same images.

    Returns:
        float (N,) in [-1, 1]; NaN where either map is constant (no ranking to compare).
    """
    a, b = _pair(a, b)
    ra, rb = average_ranks(a), average_ranks(b)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (ra * rb).sum(1) / np.sqrt((ra**2).sum(1) * (rb**2).sum(1))
    rho[blank_maps(a) | blank_maps(b)] = np.nan
    return rho


def _top(flat: np.ndarray, fraction: float) -> np.ndarray:
    """The top ``fraction`` of each row's pixels; pixels tied with the cut-off value are all in."""
    k = max(1, int(round(fraction * flat.shape[1])))
    cut = -np.partition(-flat, k - 1, axis=1)[:, k - 1 : k]  # the k-th largest value per row
    return flat >= cut


def top_overlap(a: np.ndarray, b: np.ndarray, fraction: float = 0.1) -> np.ndarray:
    """Intersection over union of the two maps' top-``fraction`` pixel sets, per image.

    Pixels tied with a map's cut-off value all belong to its set, so a coarse (upsampled) map
    is not cut at an arbitrary pixel.

    Returns:
        float (N,) in [0, 1]; NaN where either map is constant (it has no top pixels).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    a, b = _pair(a, b)
    ta, tb = _top(a, fraction), _top(b, fraction)
    iou = (ta & tb).sum(1) / (ta | tb).sum(1)
    iou[blank_maps(a) | blank_maps(b)] = np.nan
    return iou
