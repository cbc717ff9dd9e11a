"""The Serve app's predict path on onnxruntime: the registered version's ``predict.onnx``.

Loaded only after it reproduces the registered torch weights on the version's own SHAP
background (real training images) and a few seeded random images: the probabilities within
:data:`kdray.edge.export.TOLERANCE`, the same labels. A version without an export, or whose export
differs, predicts with torch instead, and the model card says which and why.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdray.edge.export import TOLERANCE, session
from kdray.edge.publish import EdgeMissing, fetch_edge

__all__ = ["OnnxPredictor", "load_onnx_predictor"]


class OnnxPredictor:
    """Class probabilities of uint8 (3, S, S) images from one onnxruntime session.

    ``session.run`` is thread-safe: the Gateway's predict workers share one session, each call
    on ``threads`` intra-op threads.
    """

    def __init__(self, sess: object, version: str) -> None:
        self.session = sess
        self.version = version

    def probabilities(self, images: Sequence[np.ndarray]) -> list[list[float]]:
        x = np.ascontiguousarray(np.stack(images), dtype=np.uint8)
        return self.session.run(["probabilities"], {"image": x})[0].tolist()


def _check_images(size: int, background: np.ndarray | None) -> np.ndarray:
    noise = np.random.default_rng(0).integers(0, 256, (8, 3, size, size), dtype=np.uint8)
    if background is None:
        return noise
    return np.concatenate([np.asarray(background, dtype=np.uint8)[:16], noise])


def load_onnx_predictor(
    name: str,
    alias: str,
    dest: str | Path,
    tracking_uri: str,
    model: nn.Module,
    threads: int = 1,
    background: np.ndarray | None = None,
) -> tuple[OnnxPredictor | None, str]:
    """``name@alias``'s ONNX predict graph, checked against ``model`` (its torch weights).

    Returns:
        (predictor, note): the predictor, or None when torch must predict; the note says which
        runtime predicts and why, for the model card and the replica's log.
    """
    try:
        folder, card = fetch_edge(name, alias, Path(dest) / "edge", tracking_uri)
    except EdgeMissing:
        return None, "torch (this version has no ONNX export; tune/export.py makes one)"
    sess = session(folder / card["files"]["predict"], threads)
    x = _check_images(int(card["image_size"]), background)
    with torch.inference_mode():
        device = next(model.parameters()).device
        ref = torch.softmax(model(torch.from_numpy(x).to(device).float() / 255.0), 1).cpu()
    got = sess.run(["probabilities"], {"image": x})[0]
    diff = float(np.abs(got - ref.numpy()).max())
    if diff > TOLERANCE or not (got.argmax(1) == ref.numpy().argmax(1)).all():
        return None, (
            f"torch (the ONNX export differs from the torch weights: max |Δ probability| "
            f"{diff:.1e} on {len(x)} images)"
        )
    import onnxruntime

    note = (
        f"onnx (onnxruntime {onnxruntime.__version__}, {card['files']['predict']}; max |Δ "
        f"probability| {diff:.1e} against torch on {len(x)} images at load)"
    )
    return OnnxPredictor(sess, onnxruntime.__version__), note
