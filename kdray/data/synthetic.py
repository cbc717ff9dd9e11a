"""Seeded synthetic stand-ins for the three public datasets, with a lesion mask per image.

The images imitate the look of the real Kaggle sets closely enough that the same folder loaders,
transforms and models run on them, and, more importantly, the classes differ by *local* visual
evidence that resembles the disease sign:

* ``brain_tumor`` (grayscale axial MRI with skull): glioma is an irregular, heterogeneous,
  infiltrative mass inside the parenchyma with a dark necrotic core, an enhancing rim and
  surrounding oedema; meningioma is a bright, homogeneous, well-circumscribed round mass attached
  to the inner skull surface; pituitary is a small bright round lesion at the midline near the
  skull base (bottom centre); notumor has none.
* ``eye_disease`` (RGB fundus photo): cataract is a blurred milky veil over part of the fundus;
  diabetic retinopathy shows red dots / blot haemorrhages and yellow hard exudates around the
  macula; glaucoma has an enlarged optic cup (high cup-to-disc ratio); normal has none.
* ``alzheimer`` (grayscale skull-stripped axial MRI): ventricles, sulci and the interhemispheric
  fissure widen with severity (NonDemented < VeryMild < Mild < Moderate).

Every image carries class-independent nuisance (pose, head / fundus size, rotation, bias field,
brightness, contrast, gamma, colour balance, blur, Rician or Gaussian noise, lesion size and
intensity), so that global intensity statistics say little about the class while a CNN that looks
at the lesion separates the classes well. The mask marks the evidence (tumour, hazed region,
DR lesions, optic disc, ventricles and widened sulci) and is empty for ``notumor`` and ``normal``.

Every image is drawn from its own generator seeded by ``(seed, dataset, class, index)``, so a file
does not depend on generation order and the same seed gives byte-identical files.
"""

from __future__ import annotations

import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from kdray.data.specs import get_spec

__all__ = ["LAYOUTS", "FOLDER_NAMES", "TEST_FRACTION", "render", "make_arrays", "generate"]

LAYOUTS: dict[str, str] = {
    "brain_tumor": "train_test",
    "eye_disease": "flat",
    "alzheimer": "flat",
}
"""Dataset id -> folder layout written by :func:`generate` (``train_test`` or ``flat``)."""

FOLDER_NAMES: dict[str, tuple[str, ...]] = {
    "brain_tumor": ("glioma", "meningioma", "notumor", "pituitary"),
    "eye_disease": ("cataract", "diabetic_retinopathy", "glaucoma", "normal"),
    # The separator variant of one public version of the Alzheimer set.
    "alzheimer": ("Non_Demented", "Very_Mild_Demented", "Mild_Demented", "Moderate_Demented"),
}
"""Dataset id -> class folder names written by :func:`generate`, in label order."""

TEST_FRACTION = 0.2
"""Share of each class written to ``Testing`` for ``train_test`` layouts."""

_FloatArray = np.ndarray


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1] (x to the right, y downwards), read-only."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    y, x = np.meshgrid(c, c, indexing="ij")
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> _FloatArray:
    """Band-limited noise of unit std: a ``cells`` x ``cells`` random field upsampled bicubically."""
    cells = max(2, int(cells))
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    img = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)
    out = np.asarray(img, dtype=np.float32)
    std = float(out.std())
    return (out - float(out.mean())) / (std if std > 1e-6 else 1.0)


def _pose(
    rng: np.random.Generator,
    size: int,
    scale: tuple[float, float],
    shift: float,
    rot_deg: float,
) -> tuple[_FloatArray, _FloatArray, dict[str, float]]:
    """Object-local coordinates (u, v) for a random shift, rotation and scale.

    Returns (u, v, pose) where a point at local (u, v) lies at image (cx, cy) + s * R(theta) (u, v)
    in [-1, 1] image coordinates; ``pose`` holds cx, cy, s, theta and ``px`` (pixels per local unit).
    """
    x, y = _grid(size)
    s = float(rng.uniform(*scale))
    cx, cy = (float(t) for t in rng.uniform(-shift, shift, 2))
    theta = float(np.deg2rad(rng.uniform(-rot_deg, rot_deg)))
    ct, st = np.cos(theta), np.sin(theta)
    dx, dy = x - cx, y - cy
    u = (ct * dx + st * dy) / s
    v = (-st * dx + ct * dy) / s
    pose = {"cx": cx, "cy": cy, "s": s, "theta": theta, "px": s * size / 2.0, "size": size}
    return u.astype(np.float32), v.astype(np.float32), pose


def _to_pixels(pose: dict[str, float], pts: np.ndarray, factor: int = 1) -> np.ndarray:
    """Map local points (N, 2) to pixel coordinates of an image ``factor`` times larger."""
    ct, st = np.cos(pose["theta"]), np.sin(pose["theta"])
    u, v = pts[:, 0], pts[:, 1]
    x = pose["cx"] + pose["s"] * (ct * u - st * v)
    y = pose["cy"] + pose["s"] * (st * u + ct * v)
    n = pose["size"] * factor
    return np.stack([(x + 1.0) * n / 2.0, (y + 1.0) * n / 2.0], axis=1)


def _soft_inside(signed_px: _FloatArray) -> _FloatArray:
    """Anti-aliased indicator of ``signed_px < 0`` (signed distance in pixels)."""
    return np.clip(0.5 - signed_px, 0.0, 1.0)


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a square of half-width ``radius`` (PIL max filter)."""
    if radius <= 0:
        return mask
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    img = img.filter(ImageFilter.MaxFilter(2 * radius + 1))
    return np.asarray(img) > 127


def _blur(img: _FloatArray, sigma: float) -> _FloatArray:
    """Gaussian blur (std ``sigma`` pixels) of a [0, 1] float image, 2-D or channels-last RGB.

    Runs through PIL on an 8-bit copy: single-threaded C and exact enough for images that are
    quantised to 8 bits anyway.
    """
    if sigma <= 0.05:
        return img
    q = Image.fromarray(np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8))
    out = np.asarray(q.filter(ImageFilter.GaussianBlur(sigma)), dtype=np.float32)
    return out / 255.0


def _supersampled(size: int, factor: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    canvas = Image.new("L", (size * factor, size * factor), 0)
    return canvas, ImageDraw.Draw(canvas)


def _downsample(canvas: Image.Image, size: int) -> _FloatArray:
    return np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0


def _mri_finish(img: _FloatArray, rng: np.random.Generator) -> np.ndarray:
    """Intensity nuisance for an MRI slice in [0, 1]: gamma, gain, contrast, blur, Rician noise."""
    img = np.clip(img, 0.0, 1.0) ** float(rng.uniform(0.7, 1.45))
    img = img * float(rng.uniform(0.7, 1.15))
    # contrast around the mid-level of the head, keeping the background black
    pivot = float(rng.uniform(0.3, 0.5))
    c = float(rng.uniform(0.8, 1.25))
    img = np.where(img > 0.02, pivot + (img - pivot) * c, img)
    img = np.clip(img, 0.0, 1.0)
    # reconstruction smoothing / interpolation blur of varying strength
    img = _blur(img, float(rng.uniform(0.0, 0.6)) * img.shape[0] / 64.0)
    sigma = float(rng.uniform(0.01, 0.07))
    n1 = rng.standard_normal(img.shape).astype(np.float32) * sigma
    n2 = rng.standard_normal(img.shape).astype(np.float32) * sigma
    img = np.sqrt((img + n1) ** 2 + n2**2)  # Rician magnitude noise
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# brain slice (shared by brain_tumor and alzheimer)
# --------------------------------------------------------------------------------------------


def _brain_slice(
    rng: np.random.Generator,
    size: int,
    *,
    skull: bool,
    atrophy: float,
    scale: tuple[float, float],
) -> tuple[_FloatArray, dict]:
    """A T1-like axial brain slice in [0, 1] and the geometry needed to add lesions.

    Args:
        rng: random generator.
        size: output side in pixels.
        skull: draw scalp and skull around the brain (brain tumour set) or a skull-stripped brain
            (Alzheimer set).
        atrophy: 0 (young, healthy) .. 3 (severe); widens ventricles, sulci and the fissure.
        scale: range of the head semi-axis (fraction of the half image side).

    Returns:
        (image, geometry) where geometry holds local coordinates ``u``, ``v``, the brain radius
        ``B`` in local units, the soft brain mask ``brain``, the soft CSF map ``csf`` (ventricles,
        sulci, fissure) and the parts ``ventricles`` and ``sulci``, and ``pose``.
    """
    u, v, pose = _pose(rng, size, scale=scale, shift=0.07, rot_deg=14.0)
    px = pose["px"]  # pixels per local unit
    aspect = float(rng.uniform(0.72, 0.88))
    rho = np.sqrt((u / aspect) ** 2 + v**2)
    phi = np.arctan2(v, u / aspect)
    # outline wobble so heads are not perfect ellipses
    wobble = 1.0 + 0.025 * _smooth_noise(rng, size, 5)
    rho_w = rho * wobble

    img = np.zeros((size, size), np.float32)
    if skull:
        scalp = float(rng.uniform(0.035, 0.07))
        bone = float(rng.uniform(0.035, 0.06))
        gap = float(rng.uniform(0.012, 0.03)) + 0.01 * atrophy
        b_radius = 1.0 - scalp - bone - gap
        head = _soft_inside((rho_w - 1.0) * px)
        img += head * float(rng.uniform(0.7, 0.95))  # scalp fat
        inner_scalp = _soft_inside((rho_w - (1.0 - scalp)) * px)
        img = img * (1 - inner_scalp) + inner_scalp * float(rng.uniform(0.03, 0.12))  # bone
        inside_bone = _soft_inside((rho_w - (1.0 - scalp - bone)) * px)
        csf_level = float(rng.uniform(0.08, 0.2))
        img = img * (1 - inside_bone) + inside_bone * csf_level  # CSF rim
    else:
        b_radius = 1.0
        csf_level = float(rng.uniform(0.0, 0.1))

    brain_px = b_radius * px
    q = rho_w / b_radius  # 1 at the brain surface
    # gyral surface: small bumps that deepen with atrophy
    surf = 1.0 - (0.012 + 0.006 * atrophy) * (1 + _smooth_noise(rng, size, 14))
    brain = _soft_inside((q - surf) * brain_px)

    # white / grey matter with fingers of white matter into the gyri
    wm_r = float(rng.uniform(0.68, 0.78))
    wm = _soft_inside((q + 0.07 * _smooth_noise(rng, size, 12) - wm_r) * brain_px * 0.6)
    gm_level = float(rng.uniform(0.45, 0.58))
    wm_level = gm_level + float(rng.uniform(0.12, 0.24))
    tissue = gm_level + (wm_level - gm_level) * wm
    # deep grey nuclei (thalami) either side of the third ventricle
    for side in (-1.0, 1.0):
        d = np.sqrt(
            ((u - side * 0.13 * b_radius) / 0.09) ** 2 + ((v - 0.08 * b_radius) / 0.12) ** 2
        )
        tissue = tissue - 0.5 * (wm_level - gm_level) * _soft_inside((d - 1.0) * 0.1 * px * 2)
    tissue = tissue * (
        1.0 + 0.035 * _smooth_noise(rng, size, 24) + 0.02 * _smooth_noise(rng, size, 48)
    )

    # --- CSF spaces that widen with atrophy ------------------------------------------------
    a = float(atrophy)
    # lateral ventricles: two rotated ellipses converging anteriorly
    vw = (0.045 + 0.032 * a) * float(rng.uniform(0.9, 1.1))
    vl = (0.24 + 0.045 * a) * float(rng.uniform(0.92, 1.08))
    vx = 0.07 + 0.015 * a + vw * 0.6
    vy = float(rng.uniform(-0.12, -0.04))
    vent = np.zeros_like(u)
    for side in (-1.0, 1.0):
        ang = -side * np.deg2rad(float(rng.uniform(10.0, 22.0)))
        du = u - side * vx * b_radius
        dv = v - vy * b_radius
        ca, sa = np.cos(ang), np.sin(ang)
        uu = ca * du + sa * dv
        vv = -sa * du + ca * dv
        e = np.sqrt((uu / (vw * b_radius)) ** 2 + (vv / (vl * b_radius)) ** 2)
        vent = np.maximum(vent, _soft_inside((e - 1.0) * vw * b_radius * px))
    # third ventricle: thin midline slit between the thalami
    w3 = (0.012 + 0.012 * a) * b_radius
    e3 = np.sqrt((u / w3) ** 2 + ((v - 0.1 * b_radius) / (0.1 * b_radius)) ** 2)
    vent = np.maximum(vent, _soft_inside((e3 - 1.0) * w3 * px))

    # sulci: radial-ish dark clefts from the surface inwards
    k = int(rng.integers(16, 29))
    phase = (
        k * phi
        + 2.2 * _smooth_noise(rng, size, 6)
        + 1.2 * _smooth_noise(rng, size, 12)
        + float(rng.uniform(0, 2 * np.pi))
    )
    wrapped = np.abs((phase + np.pi) % (2 * np.pi) - np.pi)
    dist_px = wrapped / k * np.maximum(q, 0.2) * brain_px  # arc distance to the cleft centre
    depth = (0.2 + 0.035 * a) * (1.0 + 0.25 * _smooth_noise(rng, size, 8))
    in_band = np.clip((q - (1.0 - depth)) / np.maximum(depth, 1e-3), 0.0, 1.0)
    width_px = (0.3 + 0.42 * a) * max(size / 64.0, 0.5) * (0.5 + in_band)
    width_px = width_px * (1.0 + 0.3 * _smooth_noise(rng, size, 10)).clip(0.3, None)
    sulci = _soft_inside(dist_px - 0.5 * width_px) * (in_band > 0) * np.clip(in_band * 3, 0, 1)
    # interhemispheric fissure, open in front and behind
    wf_px = (0.35 + 0.5 * a) * max(size / 64.0, 0.5)
    along = np.clip((np.abs(v) / b_radius - (0.48 - 0.03 * a)) * 8.0, 0.0, 1.0)
    fissure = _soft_inside(np.abs(u) * px - 0.5 * wf_px) * along
    sulci = np.maximum(sulci, fissure) * brain

    csf = np.maximum(vent, sulci)
    brain_img = tissue * (1 - csf) + csf_level * csf
    img = img * (1 - brain) + brain_img * brain
    # smooth bias field (coil inhomogeneity)
    img = img * (1.0 + float(rng.uniform(0.04, 0.14)) * _smooth_noise(rng, size, 3))
    geom = {
        "u": u,
        "v": v,
        "q": q,
        "phi": phi,
        "B": b_radius,
        "brain": brain,
        "csf": csf,
        "ventricles": vent * brain,
        "sulci": sulci,
        "pose": pose,
        "wm_level": wm_level,
        "gm_level": gm_level,
    }
    return img.astype(np.float32), geom


def _render_brain_tumor(
    label: int, rng: np.random.Generator, size: int
) -> tuple[np.ndarray, np.ndarray]:
    img, g = _brain_slice(
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
    gland = _soft_inside((d_c - 1.0) * 0.05 * bpx)
    img = img * (1 - gland) + gland * (wm * float(rng.uniform(0.55, 0.8)))

    if label == 0:  # glioma: irregular heterogeneous intra-axial mass, necrotic core, oedema
        r = float(rng.uniform(0.17, 0.3)) * b
        ang = float(rng.uniform(0, 2 * np.pi))
        dist = float(rng.uniform(0.15, 0.62 - r / b)) * b
        cu, cv = dist * np.cos(ang) * 0.8, dist * np.sin(ang)
        d = np.sqrt(((u - cu) / 1.0) ** 2 + ((v - cv) / float(rng.uniform(0.75, 1.3))) ** 2) / r
        # infiltrative, lobulated edge
        d = d + 0.3 * _smooth_noise(rng, size, 7) + 0.12 * _smooth_noise(rng, size, 16)
        tumour = _soft_inside((d - 1.0) * r * px) * g["brain"]
        oedema = _soft_inside((d - float(rng.uniform(1.35, 1.75))) * r * px * 0.5) * g["brain"]
        core_r = float(rng.uniform(0.35, 0.65))
        core = _soft_inside((d + 0.2 * _smooth_noise(rng, size, 14) - core_r) * r * px)
        rim = min(wm + float(rng.uniform(0.08, 0.25)), 1.0)
        texture = 1.0 + 0.2 * _smooth_noise(rng, size, 28)
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
        tumour = _soft_inside((d - 1.0) * r * px) * (g["q"] < 1.04)
        cleft = _soft_inside((d - 1.0 - 1.6 / max(r * px, 1.0)) * r * px) - tumour
        val = min(wm + float(rng.uniform(0.12, 0.3)), 1.0)
        val = val * (1.0 + 0.03 * _smooth_noise(rng, size, 20))
        img = img * (1 - 0.6 * np.clip(cleft, 0, 1))
        img = img * (1 - tumour) + val * tumour
        lesion = tumour
    elif label == 3:  # pituitary macroadenoma: small bright round midline mass at the skull base
        r = float(rng.uniform(0.09, 0.14)) * b
        cv = pit_v - float(rng.uniform(0.0, 0.5)) * r
        cu = float(rng.uniform(-0.02, 0.02)) * b
        d = np.sqrt(((u - cu) / 1.1) ** 2 + ((v - cv) / 1.0) ** 2) / r
        tumour = _soft_inside((d - 1.0) * r * px)
        val = min(wm + float(rng.uniform(0.18, 0.35)), 1.0)
        val = val * (1.0 + 0.04 * _smooth_noise(rng, size, 20))
        img = img * (1 - tumour) + val * tumour
        lesion = tumour
    if label != 2:
        mask = lesion > 0.5
        if not mask.any():  # tiny lesion at very small sizes: keep its brightest pixel
            mask = lesion >= lesion.max() * 0.5
    return _mri_finish(img, rng), mask


def _render_alzheimer(
    label: int, rng: np.random.Generator, size: int
) -> tuple[np.ndarray, np.ndarray]:
    atrophy = float(label) + float(rng.uniform(-0.22, 0.22))
    img, g = _brain_slice(rng, size, skull=False, atrophy=max(atrophy, 0.0), scale=(0.55, 0.98))
    evidence = np.maximum(g["ventricles"], g["sulci"])
    mask = _dilate(evidence > 0.35, 1)
    if not mask.any():
        mask = evidence >= evidence.max() * 0.5
    return _mri_finish(img, rng), mask


# --------------------------------------------------------------------------------------------
# fundus photographs
# --------------------------------------------------------------------------------------------


def _vessel_tree(
    rng: np.random.Generator, disc: tuple[float, float]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Polylines (local coordinates, disc on the right, macula to the left) with widths."""
    out: list[tuple[np.ndarray, np.ndarray]] = []
    # (initial angle deg, curvature deg/step, steps, width) for the four arcades, y points down
    arcades = [
        (-105.0, -3.6, 22, 0.034),
        (105.0, 3.6, 22, 0.034),
        (-55.0, 1.5, 13, 0.026),
        (55.0, -1.5, 13, 0.026),
    ]
    step = 0.05
    for a0, curv, steps, w0 in arcades:
        for vessel in range(2):  # artery and vein run side by side
            a = np.deg2rad(a0 + rng.uniform(-12, 12) + (8 if vessel else -8) * np.sign(a0))
            c = np.deg2rad(curv * rng.uniform(0.75, 1.25))
            p = np.array(disc, dtype=np.float64)
            pts = [p.copy()]
            widths = []
            w = w0 * (1.15 if vessel else 0.85)
            for i in range(steps):
                a += c + np.deg2rad(rng.normal(0, 3.5))
                p = p + step * np.array([np.cos(a), np.sin(a)])
                pts.append(p.copy())
                widths.append(w * (1.0 - 0.55 * i / steps))
                if i > 2 and rng.random() < 0.16:  # a side branch
                    b = a + np.deg2rad(rng.choice([-1, 1]) * rng.uniform(25, 50))
                    q = p.copy()
                    bpts = [q.copy()]
                    bw = []
                    for j in range(int(rng.integers(4, 9))):
                        b += np.deg2rad(rng.normal(0, 8))
                        q = q + step * 0.8 * np.array([np.cos(b), np.sin(b)])
                        bpts.append(q.copy())
                        bw.append(widths[-1] * 0.6 * (1 - 0.1 * j))
                    out.append((np.array(bpts), np.array(bw)))
            out.append((np.array(pts), np.array(widths)))
    return out


def _render_fundus(
    label: int, rng: np.random.Generator, size: int
) -> tuple[np.ndarray, np.ndarray]:
    u, v, pose = _pose(rng, size, scale=(0.8, 0.98), shift=0.05, rot_deg=8.0)
    px = pose["px"]
    side = 1.0 if rng.random() < 0.5 else -1.0  # right or left eye
    ul = u * side  # local frame with the disc on the right, the macula to the left
    rho = np.sqrt(u**2 + v**2)
    ss = 4 if size <= 96 else 2  # supersampling for vector drawings

    # --- retina background ----------------------------------------------------------------
    base = np.array(
        [rng.uniform(0.65, 0.95), rng.uniform(0.22, 0.48), rng.uniform(0.05, 0.25)], np.float32
    )
    shade = 1.0 - float(rng.uniform(0.2, 0.45)) * rho**2
    shade = shade * (
        1.0 + 0.05 * _smooth_noise(rng, size, 10) + 0.03 * _smooth_noise(rng, size, 30)
    )
    img = shade[..., None] * base[None, None, :]
    # choroidal texture in the red channel
    img[..., 0] *= 1.0 + 0.04 * _smooth_noise(rng, size, 40)

    # macula / fovea (darker, temporal to the disc)
    disc_u, disc_v = float(rng.uniform(0.3, 0.42)), float(rng.uniform(-0.07, 0.07))
    mac_u, mac_v = disc_u - float(rng.uniform(0.38, 0.46)), disc_v + float(rng.uniform(0.0, 0.06))
    dm = (ul - mac_u) ** 2 + (v - mac_v) ** 2
    img *= (1.0 - float(rng.uniform(0.2, 0.35)) * np.exp(-dm / (2 * 0.1**2)))[..., None]

    # vessels
    canvas, draw = _supersampled(size, ss)
    for pts, widths in _vessel_tree(rng, (disc_u, disc_v)):
        pts = pts.copy()
        pts[:, 0] *= side
        pix = [tuple(p) for p in _to_pixels(pose, pts, ss).tolist()]
        w_px = np.maximum(1, np.rint(widths * px * ss)).astype(int).tolist()
        start = 0
        for i in range(1, len(w_px) + 1):  # one call per run of equal width
            if i == len(w_px) or w_px[i] != w_px[start]:
                draw.line(pix[start : i + 1], fill=255, width=w_px[start], joint="curve")
                start = i
    vessel = _downsample(canvas, size)
    vcol = np.array([0.55, 0.3, 0.4], np.float32) * float(rng.uniform(0.85, 1.1))
    img = img * (1 - vessel[..., None] * (1 - vcol))

    # optic disc and cup
    rd = float(rng.uniform(0.115, 0.175))
    cdr = float(rng.uniform(0.65, 0.88)) if label == 2 else float(rng.uniform(0.15, 0.42))
    dd = np.sqrt((ul - disc_u) ** 2 + ((v - disc_v) / 1.08) ** 2)
    disc = _soft_inside((dd - rd) * px * 0.8)
    # peripapillary atrophy (any class): a pale crescent beside the disc, on the temporal side
    if rng.random() < 0.7:
        ang = np.arctan2(v - disc_v, ul - disc_u)
        off = np.abs((ang - np.pi - float(rng.uniform(-0.5, 0.5)) + np.pi) % (2 * np.pi) - np.pi)
        half = float(rng.uniform(0.6, 1.6))
        width = rd * float(rng.uniform(0.25, 0.9))
        crescent = _soft_inside((dd - rd - width * np.clip(1 - off / half, 0, 1)) * px)
        crescent = crescent * np.clip((half - off) * 3.0, 0, 1)
        ppa_col = np.array([0.95, rng.uniform(0.78, 0.9), rng.uniform(0.6, 0.78)], np.float32)
        ppa = crescent * float(rng.uniform(0.6, 0.9))
        img = img * (1 - ppa[..., None]) + ppa[..., None] * ppa_col
    disc_col = np.array([1.0, rng.uniform(0.6, 0.85), rng.uniform(0.32, 0.68)], np.float32)
    disc_val = disc_col * float(rng.uniform(0.85, 1.0)) * (1 - 0.15 * (dd / rd) ** 2)[..., None]
    img = img * (1 - disc[..., None]) + disc_val * disc[..., None]
    # vessels are visible on the disc too
    img = img * (1 - 0.6 * (vessel * disc)[..., None] * (1 - vcol))
    cup_off = float(rng.uniform(-0.15, 0.15)) * rd * (1 - cdr)
    dc = np.sqrt((ul - disc_u - cup_off) ** 2 + ((v - disc_v) / 1.12) ** 2)
    cup = _soft_inside((dc - cdr * rd) * px * 0.9) * disc
    cup_col = disc_col + float(rng.uniform(0.5, 0.8)) * (np.float32(0.97) - disc_col)
    img = img * (1 - cup[..., None]) + cup_col * cup[..., None]

    mask = np.zeros((size, size), bool)
    if label == 1:  # diabetic retinopathy: red dots, blot haemorrhages, hard exudates
        red, rdraw = _supersampled(size, ss)
        yel, ydraw = _supersampled(size, ss)
        mac = np.array([mac_u, mac_v])

        def _points(n: int, spread: float) -> np.ndarray:
            pts = []
            while len(pts) < n:
                p = mac + rng.normal(0, spread, 2)
                if np.hypot(*(p - (disc_u, disc_v))) > rd * 1.6 and np.hypot(*p) < 0.88:
                    pts.append(p)
            return np.array(pts)

        def _dots(draw: ImageDraw.ImageDraw, pts: np.ndarray, r_lo: float, r_hi: float) -> None:
            pp = pts.copy()
            pp[:, 0] *= side
            pix = _to_pixels(pose, pp, ss)
            for x0, y0 in pix:
                r = max(rng.uniform(r_lo, r_hi) * px, 0.75) * ss
                rx, ry = r * rng.uniform(0.8, 1.25), r * rng.uniform(0.8, 1.25)
                draw.ellipse([x0 - rx, y0 - ry, x0 + rx, y0 + ry], fill=255)

        _dots(rdraw, _points(int(rng.integers(12, 28)), 0.3), 0.012, 0.024)  # microaneurysms
        _dots(rdraw, _points(int(rng.integers(2, 7)), 0.28), 0.03, 0.055)  # blot haemorrhages
        n_clusters = int(rng.integers(1, 5))
        for _ in range(n_clusters):  # exudate clusters
            centre = _points(1, 0.22)[0]
            pts = centre + rng.normal(0, 0.04, (int(rng.integers(4, 10)), 2))
            _dots(ydraw, pts, 0.012, 0.028)
        a_red = _downsample(red, size) * (rho < 0.97)
        a_yel = _downsample(yel, size) * (rho < 0.97)
        red_col = np.array([0.42, 0.06, 0.04], np.float32) * float(rng.uniform(0.8, 1.15))
        yel_col = np.array([1.0, 0.88, 0.42], np.float32) * float(rng.uniform(0.9, 1.05))
        k_red = float(rng.uniform(0.75, 0.95))
        img = img * (1 - k_red * a_red[..., None]) + k_red * a_red[..., None] * red_col
        img = img * (1 - 0.9 * a_yel[..., None]) + 0.9 * a_yel[..., None] * yel_col
        mask = _dilate((a_red > 0.25) | (a_yel > 0.25), max(1, round(size / 64)))
    elif label == 2:  # glaucoma: the evidence is the optic disc with its enlarged cup
        mask = _soft_inside((dd - rd * 1.15) * px) > 0.5

    # fundus aperture
    aperture = _soft_inside((rho - 1.0) * px)
    img = img * aperture[..., None]

    # illumination flare (any class): an unfocused whitish glare over part of the fundus; unlike
    # a cataract it does not blur the vessels underneath
    if rng.random() < 0.7:
        fu, fv = rng.uniform(-0.5, 0.5, 2)
        fr = float(rng.uniform(0.45, 0.9))
        df = np.sqrt((u - fu) ** 2 + (v - fv) ** 2) / fr
        df = df * (1.0 + 0.18 * _smooth_noise(rng, size, 5))
        flare = float(rng.uniform(0.15, 0.5)) * np.clip((1.0 - df) / 0.35, 0.0, 1.0) * aperture
        tint = float(rng.uniform(0.2, 0.7))
        flare_col = tint * np.float32(0.85) + (1 - tint) * np.clip(base * 1.25, 0, 1)
        img = img * (1 - flare[..., None]) + flare[..., None] * flare_col

    if label == 0:  # cataract: blurred, hazy (milky to brunescent) veil over part of the fundus
        cu, cv = rng.uniform(-0.35, 0.35, 2)
        rr = float(rng.uniform(0.5, 0.85))
        dh = np.sqrt((u - cu) ** 2 + (v - cv) ** 2) / rr
        dh = dh * (1.0 + 0.18 * _smooth_noise(rng, size, 5))
        alpha = np.clip((1.0 - dh) / 0.35, 0.0, 1.0) * aperture
        blurred = _blur(img, float(rng.uniform(0.045, 0.07)) * size)
        img = img * (1 - alpha[..., None]) + blurred * alpha[..., None]
        veil = float(rng.uniform(0.35, 0.6)) * alpha
        whiteness = float(rng.uniform(0.2, 0.7))
        milky = whiteness * np.float32(0.85) + (1 - whiteness) * np.clip(base * 1.25, 0, 1)
        milky = milky * float(rng.uniform(0.75, 1.0)) * np.sqrt(np.clip(shade, 0.0, 1.0))[..., None]
        img = img * (1 - veil[..., None]) + veil[..., None] * milky
        mask = alpha > 0.5
        if not mask.any():
            mask = alpha >= alpha.max() * 0.5

    # global photographic nuisance (any class): faint uniform haze, colour balance, focus, noise
    haze = float(rng.uniform(0.0, 0.2)) * aperture
    haze_col = np.array([0.85, 0.8, 0.72], np.float32) * float(rng.uniform(0.6, 1.0))
    img = img * (1 - haze[..., None]) + haze[..., None] * haze_col
    img = np.clip(img, 0.0, 1.0) ** float(rng.uniform(0.75, 1.35))
    img = img * rng.uniform(0.8, 1.2, 3).astype(np.float32) * float(rng.uniform(0.6, 1.3))
    img = np.clip(img, 0.0, 1.0)
    img = _blur(img, float(rng.uniform(0.0, 0.45)) * size / 64.0)
    img = img + rng.normal(0, float(rng.uniform(0.005, 0.025)), img.shape).astype(np.float32)
    out = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return out, mask


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------

_RENDERERS = {
    "brain_tumor": _render_brain_tumor,
    "eye_disease": _render_fundus,
    "alzheimer": _render_alzheimer,
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


def _image_rng(seed: int, dataset_id: str, label: int, index: int) -> np.random.Generator:
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
            img, m = render(dataset_id, label, _image_rng(seed, dataset_id, label, i), size)
            images[j] = img[..., None] if img.ndim == 2 else img
            labels[j] = label
            masks[j] = m
            j += 1
    return images, labels, masks


def generate(
    dataset_id: str, root: Path, masks_root: Path, n_per_class: int, size: int, seed: int
) -> int:
    """Write the dataset as PNG files in the real Kaggle folder layout, plus one mask per image.

    Layouts (see :data:`LAYOUTS` and :data:`FOLDER_NAMES`):

    * ``brain_tumor``: ``root/Training/<class>/<class>_<i:05d>.png`` and ``root/Testing/...``;
      the last ``round(TEST_FRACTION * n_per_class)`` indices of each class (at least one when
      ``n_per_class >= 2``) go to ``Testing``.
    * ``eye_disease``: ``root/<class>/<class>_<i:05d>.png`` (RGB).
    * ``alzheimer``: ``root/<Folder>/<Folder>_<i:05d>.png`` with the separator folder names
      ``Non_Demented``, ``Very_Mild_Demented``, ``Mild_Demented``, ``Moderate_Demented``.

    MRI images are written as grayscale (``L``) PNGs, fundus photos as RGB. Each mask is an ``L``
    PNG with values 0 / 255 at the same relative path under ``masks_root``.

    Args:
        dataset_id: ``brain_tumor``, ``eye_disease`` or ``alzheimer``.
        root: dataset root folder (created if missing).
        masks_root: mask root folder (created if missing).
        n_per_class: images per class (before the train/test split).
        size: image side in pixels.
        seed: base seed; the same seed gives byte-identical files.

    Returns:
        The number of images written.
    """
    spec = get_spec(dataset_id)
    root, masks_root = Path(root), Path(masks_root)
    n = int(n_per_class)
    n_test = 0
    if LAYOUTS[dataset_id] == "train_test" and n >= 2:
        n_test = max(1, int(round(TEST_FRACTION * n)))
    written = 0
    for label in range(spec.num_classes):
        folder = FOLDER_NAMES[dataset_id][label]
        for i in range(n):
            if LAYOUTS[dataset_id] == "train_test":
                split = "Testing" if i >= n - n_test else "Training"
                rel = Path(split) / folder / f"{folder}_{i:05d}.png"
            else:
                rel = Path(folder) / f"{folder}_{i:05d}.png"
            img, m = render(dataset_id, label, _image_rng(seed, dataset_id, label, i), size)
            for base, arr in ((root, img), (masks_root, m.astype(np.uint8) * 255)):
                path = base / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(path, format="PNG")
            written += 1
    return written
