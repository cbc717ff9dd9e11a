"""Colour overlays and PNG bytes for explanation maps (numpy + PIL, no figure machinery).

Heat maps ([0, 1]: feature maps, Grad-CAM) use the ``jet`` colour map blended over the image;
signed maps (SHAP) show positive evidence in red and negative in blue over a grey copy of the
image, with opacity growing with |value| up to a robust maximum (99th percentile of |value|).
"""

from __future__ import annotations

import io

import matplotlib
import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "heat_layer",
    "heat_overlay",
    "png_bytes",
    "signed_layer",
    "signed_overlay",
    "signed_scale",
    "strip",
]

_JET = (matplotlib.colormaps["jet"](np.linspace(0, 1, 256))[:, :3]).astype(np.float32)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.max(initial=0.0) > 1.0:
        img = img / 255.0
    return np.clip(img, 0.0, 1.0)


def _jet(heat: np.ndarray) -> np.ndarray:
    return _JET[np.clip(np.asarray(heat, dtype=np.float32) * 255.0, 0, 255).astype(np.uint8)]


def heat_overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a [0, 1] map (H, W) over an RGB image (H, W, 3) -> uint8 (H, W, 3)."""
    out = (1.0 - alpha) * _as_rgb(image) + alpha * _jet(heat)
    return (np.clip(out, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def heat_layer(heat: np.ndarray) -> np.ndarray:
    """The map alone in ``jet`` colours, uint8 (H, W, 3): drawn over the image at any opacity,
    it gives :func:`heat_overlay` with that ``alpha``."""
    return (_jet(heat) * 255.0 + 0.5).astype(np.uint8)


def signed_scale(values: np.ndarray) -> float:
    """The |value| drawn at full strength: the 99th percentile of |values| (> 0)."""
    scale = float(np.percentile(np.abs(values), 99)) if np.size(values) else 0.0
    return scale if scale > 0 else 1.0


def signed_overlay(image: np.ndarray, values: np.ndarray, scale: float | None = None) -> np.ndarray:
    """Red (positive) / blue (negative) attribution over a grey image -> uint8 (H, W, 3).

    Args:
        image: RGB (H, W, 3) in [0, 1] or uint8.
        values: signed (H, W) attribution.
        scale: |value| drawn at full opacity; default :func:`signed_scale`.
    """
    colour, alpha = _signed_colour(values, scale)
    grey = _as_rgb(image).mean(axis=2, keepdims=True).repeat(3, axis=2) * 0.8 + 0.1
    out = (1.0 - alpha) * grey + alpha * colour
    return (np.clip(out, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _signed_colour(values: np.ndarray, scale: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: red or blue (H, W, 3) and its opacity (H, W, 1), growing with |value|."""
    v = np.asarray(values, dtype=np.float32)
    s = signed_scale(v) if scale is None else scale
    alpha = 0.85 * np.clip(np.abs(v) / s, 0.0, 1.0)[..., None]
    colour = np.where(
        v[..., None] >= 0,
        np.array([0.85, 0.05, 0.05], np.float32),
        np.array([0.05, 0.2, 0.9], np.float32),
    )
    return colour, alpha


def signed_layer(values: np.ndarray, scale: float | None = None) -> np.ndarray:
    """The attribution alone, uint8 RGBA (H, W, 4): :func:`signed_overlay`'s colours with their
    opacity in the alpha channel, to draw over the image."""
    colour, alpha = _signed_colour(values, scale)
    return (np.concatenate([colour, alpha], axis=2) * 255.0 + 0.5).astype(np.uint8)


def strip(tiles: list[np.ndarray], labels: list[str] | None = None, gap: int = 2) -> np.ndarray:
    """Tiles (H, W, 3 uint8) side by side, white gaps, optional caption band on top."""
    h = max(t.shape[0] for t in tiles)
    band = 12 if labels else 0
    width = sum(t.shape[1] for t in tiles) + gap * (len(tiles) - 1)
    canvas = Image.new("RGB", (width, h + band), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for i, tile in enumerate(tiles):
        canvas.paste(Image.fromarray(tile), (x, band))
        if labels:
            draw.text((x + 1, 0), labels[i][: max(1, tile.shape[1] // 6)], fill="black")
        x += tile.shape[1] + gap
    return np.asarray(canvas)


def png_bytes(rgb: np.ndarray) -> bytes:
    """uint8 (H, W, 3) RGB or (H, W, 4) RGBA -> PNG file bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
