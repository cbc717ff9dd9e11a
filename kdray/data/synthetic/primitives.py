"""Drawing primitives the synthetic stand-ins share: coordinates, noise, shapes, blur.

Pixel-centre grids and object poses in [-1, 1] image coordinates, band-limited noise, anti-aliased
indicators, dilation and blur through PIL, and supersampled canvases for vector drawings
(:mod:`kdray.data.synthetic`).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    "FloatArray",
    "blur",
    "dilate",
    "downsample",
    "random_pose",
    "smooth_noise",
    "soft_inside",
    "supersampled",
    "to_pixels",
]

FloatArray = np.ndarray


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1] (x to the right, y downwards), read-only."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    y, x = np.meshgrid(c, c, indexing="ij")
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> FloatArray:
    """Band-limited noise of unit std: a ``cells`` x ``cells`` random field upsampled bicubically."""
    cells = max(2, int(cells))
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    img = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)
    out = np.asarray(img, dtype=np.float32)
    std = float(out.std())
    return (out - float(out.mean())) / (std if std > 1e-6 else 1.0)


def random_pose(
    rng: np.random.Generator,
    size: int,
    scale: tuple[float, float],
    shift: float,
    rot_deg: float,
) -> tuple[FloatArray, FloatArray, dict[str, float]]:
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


def to_pixels(pose: dict[str, float], pts: np.ndarray, factor: int = 1) -> np.ndarray:
    """Map local points (N, 2) to pixel coordinates of an image ``factor`` times larger."""
    ct, st = np.cos(pose["theta"]), np.sin(pose["theta"])
    u, v = pts[:, 0], pts[:, 1]
    x = pose["cx"] + pose["s"] * (ct * u - st * v)
    y = pose["cy"] + pose["s"] * (st * u + ct * v)
    n = pose["size"] * factor
    return np.stack([(x + 1.0) * n / 2.0, (y + 1.0) * n / 2.0], axis=1)


def soft_inside(signed_px: FloatArray) -> FloatArray:
    """Anti-aliased indicator of ``signed_px < 0`` (signed distance in pixels)."""
    return np.clip(0.5 - signed_px, 0.0, 1.0)


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a square of half-width ``radius`` (PIL max filter)."""
    if radius <= 0:
        return mask
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    img = img.filter(ImageFilter.MaxFilter(2 * radius + 1))
    return np.asarray(img) > 127


def blur(img: FloatArray, sigma: float) -> FloatArray:
    """Gaussian blur (std ``sigma`` pixels) of a [0, 1] float image, 2-D or channels-last RGB.

    Runs through PIL on an 8-bit copy: single-threaded C and exact enough for images that are
    quantised to 8 bits anyway.
    """
    if sigma <= 0.05:
        return img
    q = Image.fromarray(np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8))
    out = np.asarray(q.filter(ImageFilter.GaussianBlur(sigma)), dtype=np.float32)
    return out / 255.0


def supersampled(size: int, factor: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    canvas = Image.new("L", (size * factor, size * factor), 0)
    return canvas, ImageDraw.Draw(canvas)


def downsample(canvas: Image.Image, size: int) -> FloatArray:
    return np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0
