"""The MRI both brain stand-ins draw on: a T1-like axial brain slice and the scanner's nuisance.

:func:`brain_slice` draws the head (with or without skull), grey and white matter and the CSF
spaces that widen with atrophy; :func:`mri_finish` adds the intensity nuisance of a scan (gamma,
gain, contrast, blur, Rician noise). Used by :mod:`kdray.data.synthetic.brain_tumor` and
:mod:`kdray.data.synthetic.alzheimer`.
"""

from __future__ import annotations

import numpy as np

from kdray.data.synthetic.primitives import FloatArray, blur, random_pose, smooth_noise, soft_inside

__all__ = ["brain_slice", "mri_finish"]


def mri_finish(img: FloatArray, rng: np.random.Generator) -> np.ndarray:
    """Intensity nuisance for an MRI slice in [0, 1]: gamma, gain, contrast, blur, Rician noise."""
    img = np.clip(img, 0.0, 1.0) ** float(rng.uniform(0.7, 1.45))
    img = img * float(rng.uniform(0.7, 1.15))
    # contrast around the mid-level of the head, keeping the background black
    pivot = float(rng.uniform(0.3, 0.5))
    c = float(rng.uniform(0.8, 1.25))
    img = np.where(img > 0.02, pivot + (img - pivot) * c, img)
    img = np.clip(img, 0.0, 1.0)
    # reconstruction smoothing / interpolation blur of varying strength
    img = blur(img, float(rng.uniform(0.0, 0.6)) * img.shape[0] / 64.0)
    sigma = float(rng.uniform(0.01, 0.07))
    n1 = rng.standard_normal(img.shape).astype(np.float32) * sigma
    n2 = rng.standard_normal(img.shape).astype(np.float32) * sigma
    img = np.sqrt((img + n1) ** 2 + n2**2)  # Rician magnitude noise
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def brain_slice(
    rng: np.random.Generator,
    size: int,
    *,
    skull: bool,
    atrophy: float,
    scale: tuple[float, float],
) -> tuple[FloatArray, dict]:
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
    u, v, pose = random_pose(rng, size, scale=scale, shift=0.07, rot_deg=14.0)
    px = pose["px"]  # pixels per local unit
    aspect = float(rng.uniform(0.72, 0.88))
    rho = np.sqrt((u / aspect) ** 2 + v**2)
    phi = np.arctan2(v, u / aspect)
    # outline wobble so heads are not perfect ellipses
    wobble = 1.0 + 0.025 * smooth_noise(rng, size, 5)
    rho_w = rho * wobble

    img = np.zeros((size, size), np.float32)
    if skull:
        scalp = float(rng.uniform(0.035, 0.07))
        bone = float(rng.uniform(0.035, 0.06))
        gap = float(rng.uniform(0.012, 0.03)) + 0.01 * atrophy
        b_radius = 1.0 - scalp - bone - gap
        head = soft_inside((rho_w - 1.0) * px)
        img += head * float(rng.uniform(0.7, 0.95))  # scalp fat
        inner_scalp = soft_inside((rho_w - (1.0 - scalp)) * px)
        img = img * (1 - inner_scalp) + inner_scalp * float(rng.uniform(0.03, 0.12))  # bone
        inside_bone = soft_inside((rho_w - (1.0 - scalp - bone)) * px)
        csf_level = float(rng.uniform(0.08, 0.2))
        img = img * (1 - inside_bone) + inside_bone * csf_level  # CSF rim
    else:
        b_radius = 1.0
        csf_level = float(rng.uniform(0.0, 0.1))

    brain_px = b_radius * px
    q = rho_w / b_radius  # 1 at the brain surface
    # gyral surface: small bumps that deepen with atrophy
    surf = 1.0 - (0.012 + 0.006 * atrophy) * (1 + smooth_noise(rng, size, 14))
    brain = soft_inside((q - surf) * brain_px)

    # white / grey matter with fingers of white matter into the gyri
    wm_r = float(rng.uniform(0.68, 0.78))
    wm = soft_inside((q + 0.07 * smooth_noise(rng, size, 12) - wm_r) * brain_px * 0.6)
    gm_level = float(rng.uniform(0.45, 0.58))
    wm_level = gm_level + float(rng.uniform(0.12, 0.24))
    tissue = gm_level + (wm_level - gm_level) * wm
    # deep grey nuclei (thalami) either side of the third ventricle
    for side in (-1.0, 1.0):
        d = np.sqrt(
            ((u - side * 0.13 * b_radius) / 0.09) ** 2 + ((v - 0.08 * b_radius) / 0.12) ** 2
        )
        tissue = tissue - 0.5 * (wm_level - gm_level) * soft_inside((d - 1.0) * 0.1 * px * 2)
    tissue = tissue * (
        1.0 + 0.035 * smooth_noise(rng, size, 24) + 0.02 * smooth_noise(rng, size, 48)
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
        vent = np.maximum(vent, soft_inside((e - 1.0) * vw * b_radius * px))
    # third ventricle: thin midline slit between the thalami
    w3 = (0.012 + 0.012 * a) * b_radius
    e3 = np.sqrt((u / w3) ** 2 + ((v - 0.1 * b_radius) / (0.1 * b_radius)) ** 2)
    vent = np.maximum(vent, soft_inside((e3 - 1.0) * w3 * px))

    # sulci: radial-ish dark clefts from the surface inwards
    k = int(rng.integers(16, 29))
    phase = (
        k * phi
        + 2.2 * smooth_noise(rng, size, 6)
        + 1.2 * smooth_noise(rng, size, 12)
        + float(rng.uniform(0, 2 * np.pi))
    )
    wrapped = np.abs((phase + np.pi) % (2 * np.pi) - np.pi)
    dist_px = wrapped / k * np.maximum(q, 0.2) * brain_px  # arc distance to the cleft centre
    depth = (0.2 + 0.035 * a) * (1.0 + 0.25 * smooth_noise(rng, size, 8))
    in_band = np.clip((q - (1.0 - depth)) / np.maximum(depth, 1e-3), 0.0, 1.0)
    width_px = (0.3 + 0.42 * a) * max(size / 64.0, 0.5) * (0.5 + in_band)
    width_px = width_px * (1.0 + 0.3 * smooth_noise(rng, size, 10)).clip(0.3, None)
    sulci = soft_inside(dist_px - 0.5 * width_px) * (in_band > 0) * np.clip(in_band * 3, 0, 1)
    # interhemispheric fissure, open in front and behind
    wf_px = (0.35 + 0.5 * a) * max(size / 64.0, 0.5)
    along = np.clip((np.abs(v) / b_radius - (0.48 - 0.03 * a)) * 8.0, 0.0, 1.0)
    fissure = soft_inside(np.abs(u) * px - 0.5 * wf_px) * along
    sulci = np.maximum(sulci, fissure) * brain

    csf = np.maximum(vent, sulci)
    brain_img = tissue * (1 - csf) + csf_level * csf
    img = img * (1 - brain) + brain_img * brain
    # smooth bias field (coil inhomogeneity)
    img = img * (1.0 + float(rng.uniform(0.04, 0.14)) * smooth_noise(rng, size, 3))
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
