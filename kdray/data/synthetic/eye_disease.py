"""The synthetic fundus photo (``eye_disease``): retina, vessels, optic disc, and the disease sign.

Cataract is a blurred milky veil over part of the fundus; diabetic retinopathy shows red dots /
blot haemorrhages and yellow hard exudates around the macula; glaucoma has an enlarged optic cup
(high cup-to-disc ratio); normal has none. The mask marks the hazed region, the DR lesions or the
optic disc.
"""

from __future__ import annotations

import numpy as np
from PIL import ImageDraw

from kdray.data.synthetic.primitives import (
    blur,
    dilate,
    downsample,
    random_pose,
    smooth_noise,
    soft_inside,
    supersampled,
    to_pixels,
)

__all__ = ["render_fundus"]


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


def render_fundus(label: int, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One image (uint8, ``(size, size, 3)``) and its mask: :func:`kdray.data.synthetic.render`."""
    u, v, pose = random_pose(rng, size, scale=(0.8, 0.98), shift=0.05, rot_deg=8.0)
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
    shade = shade * (1.0 + 0.05 * smooth_noise(rng, size, 10) + 0.03 * smooth_noise(rng, size, 30))
    img = shade[..., None] * base[None, None, :]
    # choroidal texture in the red channel
    img[..., 0] *= 1.0 + 0.04 * smooth_noise(rng, size, 40)

    # macula / fovea (darker, temporal to the disc)
    disc_u, disc_v = float(rng.uniform(0.3, 0.42)), float(rng.uniform(-0.07, 0.07))
    mac_u, mac_v = disc_u - float(rng.uniform(0.38, 0.46)), disc_v + float(rng.uniform(0.0, 0.06))
    dm = (ul - mac_u) ** 2 + (v - mac_v) ** 2
    img *= (1.0 - float(rng.uniform(0.2, 0.35)) * np.exp(-dm / (2 * 0.1**2)))[..., None]

    # vessels
    canvas, draw = supersampled(size, ss)
    for pts, widths in _vessel_tree(rng, (disc_u, disc_v)):
        pts = pts.copy()
        pts[:, 0] *= side
        pix = [tuple(p) for p in to_pixels(pose, pts, ss).tolist()]
        w_px = np.maximum(1, np.rint(widths * px * ss)).astype(int).tolist()
        start = 0
        for i in range(1, len(w_px) + 1):  # one call per run of equal width
            if i == len(w_px) or w_px[i] != w_px[start]:
                draw.line(pix[start : i + 1], fill=255, width=w_px[start], joint="curve")
                start = i
    vessel = downsample(canvas, size)
    vcol = np.array([0.55, 0.3, 0.4], np.float32) * float(rng.uniform(0.85, 1.1))
    img = img * (1 - vessel[..., None] * (1 - vcol))

    # optic disc and cup
    rd = float(rng.uniform(0.115, 0.175))
    cdr = float(rng.uniform(0.65, 0.88)) if label == 2 else float(rng.uniform(0.15, 0.42))
    dd = np.sqrt((ul - disc_u) ** 2 + ((v - disc_v) / 1.08) ** 2)
    disc = soft_inside((dd - rd) * px * 0.8)
    # peripapillary atrophy (any class): a pale crescent beside the disc, on the temporal side
    if rng.random() < 0.7:
        ang = np.arctan2(v - disc_v, ul - disc_u)
        off = np.abs((ang - np.pi - float(rng.uniform(-0.5, 0.5)) + np.pi) % (2 * np.pi) - np.pi)
        half = float(rng.uniform(0.6, 1.6))
        width = rd * float(rng.uniform(0.25, 0.9))
        crescent = soft_inside((dd - rd - width * np.clip(1 - off / half, 0, 1)) * px)
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
    cup = soft_inside((dc - cdr * rd) * px * 0.9) * disc
    cup_col = disc_col + float(rng.uniform(0.5, 0.8)) * (np.float32(0.97) - disc_col)
    img = img * (1 - cup[..., None]) + cup_col * cup[..., None]

    mask = np.zeros((size, size), bool)
    if label == 1:  # diabetic retinopathy: red dots, blot haemorrhages, hard exudates
        red, rdraw = supersampled(size, ss)
        yel, ydraw = supersampled(size, ss)
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
            pix = to_pixels(pose, pp, ss)
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
        a_red = downsample(red, size) * (rho < 0.97)
        a_yel = downsample(yel, size) * (rho < 0.97)
        red_col = np.array([0.42, 0.06, 0.04], np.float32) * float(rng.uniform(0.8, 1.15))
        yel_col = np.array([1.0, 0.88, 0.42], np.float32) * float(rng.uniform(0.9, 1.05))
        k_red = float(rng.uniform(0.75, 0.95))
        img = img * (1 - k_red * a_red[..., None]) + k_red * a_red[..., None] * red_col
        img = img * (1 - 0.9 * a_yel[..., None]) + 0.9 * a_yel[..., None] * yel_col
        mask = dilate((a_red > 0.25) | (a_yel > 0.25), max(1, round(size / 64)))
    elif label == 2:  # glaucoma: the evidence is the optic disc with its enlarged cup
        mask = soft_inside((dd - rd * 1.15) * px) > 0.5

    # fundus aperture
    aperture = soft_inside((rho - 1.0) * px)
    img = img * aperture[..., None]

    # illumination flare (any class): an unfocused whitish glare over part of the fundus; unlike
    # a cataract it does not blur the vessels underneath
    if rng.random() < 0.7:
        fu, fv = rng.uniform(-0.5, 0.5, 2)
        fr = float(rng.uniform(0.45, 0.9))
        df = np.sqrt((u - fu) ** 2 + (v - fv) ** 2) / fr
        df = df * (1.0 + 0.18 * smooth_noise(rng, size, 5))
        flare = float(rng.uniform(0.15, 0.5)) * np.clip((1.0 - df) / 0.35, 0.0, 1.0) * aperture
        tint = float(rng.uniform(0.2, 0.7))
        flare_col = tint * np.float32(0.85) + (1 - tint) * np.clip(base * 1.25, 0, 1)
        img = img * (1 - flare[..., None]) + flare[..., None] * flare_col

    if label == 0:  # cataract: blurred, hazy (milky to brunescent) veil over part of the fundus
        cu, cv = rng.uniform(-0.35, 0.35, 2)
        rr = float(rng.uniform(0.5, 0.85))
        dh = np.sqrt((u - cu) ** 2 + (v - cv) ** 2) / rr
        dh = dh * (1.0 + 0.18 * smooth_noise(rng, size, 5))
        alpha = np.clip((1.0 - dh) / 0.35, 0.0, 1.0) * aperture
        blurred = blur(img, float(rng.uniform(0.045, 0.07)) * size)
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
    img = blur(img, float(rng.uniform(0.0, 0.45)) * size / 64.0)
    img = img + rng.normal(0, float(rng.uniform(0.005, 0.025)), img.shape).astype(np.float32)
    out = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return out, mask
