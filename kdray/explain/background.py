"""The SHAP background: a fixed, stratified sample of training images kept with the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = [
    "BACKGROUND_FILE",
    "load_background",
    "save_background",
    "select_background",
    "stratified_indices",
]

BACKGROUND_FILE = "explain_background.npz"


def stratified_indices(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Indices of a class-balanced sample: classes take turns, each shuffled with ``seed``.

    Args:
        labels: (N,) class indices.
        n: sample size; all indices when N <= n.
        seed: the same seed and labels give the same sample.

    Returns:
        Sorted int64 indices, ``min(n, N)`` of them.

    Raises:
        ValueError: ``n`` < 1.
    """
    if n < 1:
        raise ValueError(f"sample size must be >= 1, got {n}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    pools = [list(rng.permutation(np.flatnonzero(labels == c))) for c in np.unique(labels)]
    picked: list[int] = []
    while len(picked) < min(n, len(labels)):
        for pool in pools:
            if pool and len(picked) < n:
                picked.append(int(pool.pop(0)))
    return np.sort(np.asarray(picked, dtype=np.int64))


def select_background(images: np.ndarray, labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """A class-balanced sample of ``n`` training images (see :func:`stratified_indices`).

    Args:
        images: uint8 (N, 3, H, W) training images.
        labels: (N,) class indices.
        n: background size (``ExplainConfig.shap_background``).
        seed: the same seed and data give the same background.

    Returns:
        uint8 (min(n, N), 3, H, W), a copy.

    Raises:
        ValueError: ``n`` < 1 or images and labels of different lengths.
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    return np.ascontiguousarray(images[stratified_indices(labels, n, seed)])


def save_background(directory: str | Path, images: np.ndarray) -> Path:
    """Write the background next to a saved model (``explain_background.npz``, no pickle)."""
    path = Path(directory) / BACKGROUND_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, images=np.asarray(images, dtype=np.uint8))
    return path


def load_background(directory: str | Path) -> np.ndarray | None:
    """The background saved by :func:`save_background`, or None when the model has none."""
    path = Path(directory) / BACKGROUND_FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        return z["images"]
