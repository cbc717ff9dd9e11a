"""The synthetic Alzheimer MRI (``alzheimer``): a skull-stripped axial slice, atrophy by class.

Ventricles, sulci and the interhemispheric fissure widen with severity (NonDemented < VeryMild <
Mild < Moderate); the mask marks the ventricles and widened sulci.
"""

from __future__ import annotations

import numpy as np

from kdray.data.synthetic.mri import brain_slice, mri_finish
from kdray.data.synthetic.primitives import dilate

__all__ = ["render_alzheimer"]


def render_alzheimer(
    label: int, rng: np.random.Generator, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """One image (uint8, ``(size, size)``) and its mask: :func:`kdray.data.synthetic.render`."""
    atrophy = float(label) + float(rng.uniform(-0.22, 0.22))
    img, g = brain_slice(rng, size, skull=False, atrophy=max(atrophy, 0.0), scale=(0.55, 0.98))
    evidence = np.maximum(g["ventricles"], g["sulci"])
    mask = dilate(evidence > 0.35, 1)
    if not mask.any():
        mask = evidence >= evidence.max() * 0.5
    return mri_finish(img, rng), mask
