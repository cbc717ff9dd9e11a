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

from kdray.edge.export import MAP_TOLERANCE, TOLERANCE, cam_difference, enough_clear, session
from kdray.edge.publish import EdgeMissing, fetch_edge
from kdray.explain.cam_methods import CAM_METHODS, CAM_TITLES

__all__ = [
    "Export",
    "OnnxExplainer",
    "OnnxPredictor",
    "check_images",
    "fetch_export",
    "load_onnx_explainer",
    "load_onnx_predictor",
]


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


def check_images(size: int, background: np.ndarray | None) -> np.ndarray:
    """The images an export is checked on against its weights: up to 16 of the model's own
    background images (real inputs) and 8 of seeded noise (the whole uint8 range)."""
    noise = np.random.default_rng(0).integers(0, 256, (8, 3, size, size), dtype=np.uint8)
    if background is None:
        return noise
    return np.concatenate([np.asarray(background, dtype=np.uint8)[:16], noise])


Export = tuple[Path, dict]  # the version's onnx/ folder and its card (model.json)


def fetch_export(
    name: str, alias: str, dest: str | Path, tracking_uri: str, version: str | None = None
) -> Export | None:
    """``name@alias``'s (or ``version``'s) ONNX export downloaded under ``dest``, or None when it
    has none."""
    try:
        return fetch_edge(name, alias, Path(dest) / "edge", tracking_uri, version=version)
    except EdgeMissing:
        return None


def load_onnx_predictor(
    export: Export | None,
    model: nn.Module,
    threads: int = 1,
    background: np.ndarray | None = None,
) -> tuple[OnnxPredictor | None, str]:
    """The export's predict graph (:func:`fetch_export`), checked against ``model`` (its torch
    weights).

    Returns:
        (predictor, note): the predictor, or None when torch must predict; the note says which
        runtime predicts and why, for the model card and the replica's log.
    """
    if export is None:
        return None, "torch (this version has no ONNX export; tune/export.py makes one)"
    folder, card = export
    sess = session(folder / card["files"]["predict"], threads)
    x = check_images(int(card["image_size"]), background)
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


class OnnxExplainer:
    """The student's feature maps (every block) and Grad-CAM (of its predicted class) from the
    exported explain graph (``model.onnx``): one onnxruntime pass instead of torch's forward,
    forward again and backward. :func:`kdray.explain.explain` uses it when asked for exactly
    what the graph computes (see its ``graph`` argument)."""

    def __init__(self, sess: object, card: dict) -> None:
        self.session = sess
        self.feature_layers = list(card["feature_layers"])
        self.cam_layer = str(card["cam_layer"])
        # An export made before CAM variants wrote a sentence here: it computed Grad-CAM.
        method = str(card.get("cam_method", "gradcam"))
        self.cam_method = method if method in CAM_METHODS else "gradcam"

    def run(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """uint8 (1, 3, S, S) -> logits (1, C), feature maps (1, L, S, S), Grad-CAM (1, S, S)."""
        x = np.ascontiguousarray(image, dtype=np.uint8)
        logits, maps, cam = self.session.run(["logits", "feature_maps", "gradcam"], {"image": x})
        return logits, maps, cam


def load_onnx_explainer(
    export: Export | None,
    model: nn.Module,
    threads: int = 1,
    background: np.ndarray | None = None,
) -> tuple[OnnxExplainer | None, str]:
    """The export's explain graph (:func:`fetch_export`), checked against kdray's torch
    explainers on ``model`` (feature maps and Grad-CAM of 4 background images and 2 random ones,
    within :data:`kdray.edge.export.MAP_TOLERANCE`, logits within ``TOLERANCE``; the CAM on the
    images without a near tie, as at export: :func:`kdray.edge.export.cam_difference`).

    Returns:
        (explainer, note): None when torch must explain; the note says which and why.
    """
    from kdray.explain.gradcam import grad_cam
    from kdray.explain.layer_maps import feature_maps

    if export is None:
        return None, "torch (this version has no ONNX export)"
    folder, card = export
    explainer = OnnxExplainer(session(folder / card["files"]["explain"], threads), card)
    images = check_images(int(card["image_size"]), background)
    x = np.concatenate([images[:4], images[-2:]])
    logits, maps, cam = explainer.run(x)
    fm = feature_maps(model, x, explainer.feature_layers)
    ref_cam = grad_cam(
        model, x, explainer.cam_layer, fm.logits.argmax(1), explainer.cam_method
    ).maps
    cam_diff, near, _ = cam_difference(model, explainer.cam_layer, x, cam, ref_cam)
    map_diff = max(float(np.abs(maps - fm.maps).max()), cam_diff)
    diff = max(map_diff, float(np.abs(logits - fm.logits).max()))
    if not enough_clear(len(x), near):
        return None, (
            f"torch (the ONNX explain graph could not be checked: {near} of {len(x)} images have a "
            "near tie on the CAM's gradient path, where float32 rounding can move the CAM)"
        )
    if (
        map_diff > MAP_TOLERANCE
        or float(np.abs(logits - fm.logits).max()) > TOLERANCE
        or not (logits.argmax(1) == fm.logits.argmax(1)).all()
    ):
        return None, f"torch (the ONNX explain graph differs from torch: max |Δ| {diff:.1e})"
    return explainer, (
        f"onnx ({card['files']['explain']}: feature maps and {CAM_TITLES[explainer.cam_method]} "
        f"at {explainer.cam_layer} in one pass; max |Δ| {diff:.1e} against torch on {len(x)} "
        "images at load)"
    )
