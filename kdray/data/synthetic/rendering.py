"""One synthetic image and its lesion mask per call, or a balanced set of them in memory.

:func:`render` dispatches to each dataset's generator; :func:`image_rng` seeds every image by
``(seed, dataset, class, index)``, so an image does not depend on generation order.
"""

from __future__ import annotations

import zlib

import numpy as np

from kdray.data.specs import get_spec
from kdray.data.synthetic.alzheimer import render_alzheimer
from kdray.data.synthetic.brain_tumor import render_brain_tumor
from kdray.data.synthetic.eye_disease import render_fundus

__all__ = ["image_rng", "make_arrays", "render"]

_RENDERERS = {
    "brain_tumor": render_brain_tumor,
    "eye_disease": render_fundus,
    "alzheimer": render_alzheimer,
}


def render(
    dataset_id: str, label: int, rng: np.random.Generator, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image and its lesion mask.

    Args:
        dataset_id: ``brain_tumor``, ``eye_disease`` or ``alzheimer``.
        label: class index in the spec's label order.
        rng: the generator to draw from (the image is a pure function of its state).
        size: side of the square image in pixels (at least 16).

    Returns:
        (image, mask): image is uint8, ``(size, size)`` for the MRI datasets and
        ``(size, size, 3)`` for ``eye_disease``; mask is bool ``(size, size)``, True on the
        lesion / evidence and all False for ``notumor`` and ``normal``.

    Raises:
        ValueError: unknown dataset, label out of range, or size below 16.
    """
    spec = get_spec(dataset_id)
    if not 0 <= int(label) < spec.num_classes:
        raise ValueError(
            f"label {label} out of range for {dataset_id} ({spec.num_classes} classes)"
        )
    if int(size) < 16:
        raise ValueError(f"size must be at least 16, got {size}")
    image, mask = _RENDERERS[dataset_id](int(label), rng, int(size))
    return image, mask.astype(bool)


def image_rng(seed: int, dataset_id: str, label: int, index: int) -> np.random.Generator:
    """Independent generator per (seed, dataset, class, index): order-free and reproducible."""
    key = zlib.crc32(dataset_id.encode("utf-8"))
    return np.random.default_rng([int(seed) % 2**64, key, int(label), int(index)])


def make_arrays(
    dataset_id: str, n_per_class: int, size: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render a balanced dataset in memory.

    Args:
        dataset_id: ``brain_tumor``, ``eye_disease`` or ``alzheimer``.
        n_per_class: images per class.
        size: image side in pixels.
        seed: base seed; the same seed gives identical arrays.

    Returns:
        (images, labels, masks): images ``(N, size, size, 3)`` uint8 (grayscale repeated to three
        channels), labels ``(N,)`` int64 grouped by class, masks ``(N, size, size)`` bool, with
        ``N = n_per_class * num_classes``.
    """
    spec = get_spec(dataset_id)
    n = int(n_per_class) * spec.num_classes
    images = np.empty((n, size, size, 3), np.uint8)
    labels = np.empty((n,), np.int64)
    masks = np.empty((n, size, size), bool)
    j = 0
    for label in range(spec.num_classes):
        for i in range(int(n_per_class)):
            img, m = render(dataset_id, label, image_rng(seed, dataset_id, label, i), size)
            images[j] = img[..., None] if img.ndim == 2 else img
            labels[j] = label
            masks[j] = m
            j += 1
    return images, labels, masks
