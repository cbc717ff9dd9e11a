"""The synthetic brain tumour MRI (``brain_tumor``): an axial slice with skull and one tumour.

Glioma is an irregular, heterogeneous, infiltrative mass inside the parenchyma with a dark
necrotic core, an enhancing rim and surrounding oedema; meningioma is a bright, homogeneous,
well-circumscribed round mass attached to the inner skull surface; pituitary is a small bright
round lesion at the midline near the skull base (bottom centre); notumor has none. The mask marks
the tumour.
"""

from __future__ import annotations

import numpy as np

from kdray.data.synthetic.mri import brain_slice, mri_finish
from kdray.data.synthetic.primitives import smooth_noise, soft_inside

__all__ = ["render_brain_tumor"]


def render_brain_tumor(
    label: int, rng: np.random.Generator, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """One image (uint8, ``(size, size)``) and its mask: :func:`kdray.data.synthetic.render`."""
    img, g = brain_slice(
        rng, size, skull=True, atrophy=float(rng.uniform(0.0, 0.8)), scale=(0.72, 0.95)
    )
    u, v, b, px = g["u"], g["v"], g["B"], g["pose"]["px"]
    bpx = b * px
    wm = g["wm_level"]
    mask = np.zeros((size, size), bool)
    lesion = np.zeros((size, size), np.float32)

    # a normal suprasellar cistern / gland at the bottom-centre in every class
    pit_v = float(rng.uniform(0.58, 0.7)) * b
    d_c = np.sqrt((u / (0.06 * b)) ** 2 + ((v - pit_v) / (0.05 * b)) ** 2)
    gland = soft_inside((d_c - 1.0) * 0.05 * bpx)
    img = img * (1 - gland) + gland * (wm * float(rng.uniform(0.55, 0.8)))

    if label == 0:  # glioma: irregular heterogeneous intra-axial mass, necrotic core, oedema
        r = float(rng.uniform(0.17, 0.3)) * b
        ang = float(rng.uniform(0, 2 * np.pi))
        dist = float(rng.uniform(0.15, 0.62 - r / b)) * b
        cu, cv = dist * np.cos(ang) * 0.8, dist * np.sin(ang)
        d = np.sqrt(((u - cu) / 1.0) ** 2 + ((v - cv) / float(rng.uniform(0.75, 1.3))) ** 2) / r
        # infiltrative, lobulated edge
        d = d + 0.3 * smooth_noise(rng, size, 7) + 0.12 * smooth_noise(rng, size, 16)
        tumour = soft_inside((d - 1.0) * r * px) * g["brain"]
        oedema = soft_inside((d - float(rng.uniform(1.35, 1.75))) * r * px * 0.5) * g["brain"]
        core_r = float(rng.uniform(0.35, 0.65))
        core = soft_inside((d + 0.2 * smooth_noise(rng, size, 14) - core_r) * r * px)
        rim = min(wm + float(rng.uniform(0.08, 0.25)), 1.0)
        texture = 1.0 + 0.2 * smooth_noise(rng, size, 28)
        val = (rim * (1 - core) + float(rng.uniform(0.1, 0.28)) * core) * texture
        img = img * (1 - oedema * float(rng.uniform(0.2, 0.35)))
        img = img * (1 - tumour) + val * tumour
        lesion = tumour
    elif label == 1:  # meningioma: extra-axial, dural based, round, bright, homogeneous
        r = float(rng.uniform(0.15, 0.25)) * b
        ang = float(rng.uniform(0, 2 * np.pi))
        rad = b - r * float(rng.uniform(0.35, 0.7))
        cu, cv = rad * np.cos(ang) * 0.8, rad * np.sin(ang)
        d = np.sqrt((u - cu) ** 2 + (v - cv) ** 2) / r
        tumour = soft_inside((d - 1.0) * r * px) * (g["q"] < 1.04)
        cleft = soft_inside((d - 1.0 - 1.6 / max(r * px, 1.0)) * r * px) - tumour
        val = min(wm + float(rng.uniform(0.12, 0.3)), 1.0)
        val = val * (1.0 + 0.03 * smooth_noise(rng, size, 20))
        img = img * (1 - 0.6 * np.clip(cleft, 0, 1))
        img = img * (1 - tumour) + val * tumour
        lesion = tumour
    elif label == 3:  # pituitary macroadenoma: small bright round midline mass at the skull base
        r = float(rng.uniform(0.09, 0.14)) * b
        cv = pit_v - float(rng.uniform(0.0, 0.5)) * r
        cu = float(rng.uniform(-0.02, 0.02)) * b
        d = np.sqrt(((u - cu) / 1.1) ** 2 + ((v - cv) / 1.0) ** 2) / r
        tumour = soft_inside((d - 1.0) * r * px)
        val = min(wm + float(rng.uniform(0.18, 0.35)), 1.0)
        val = val * (1.0 + 0.04 * smooth_noise(rng, size, 20))
        img = img * (1 - tumour) + val * tumour
        lesion = tumour
    if label != 2:
        mask = lesion > 0.5
        if not mask.any():  # tiny lesion at very small sizes: keep its brightest pixel
            mask = lesion >= lesion.max() * 0.5
    return mri_finish(img, rng), mask
