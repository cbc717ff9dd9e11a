"""Export a trained student to ONNX, check it against torch, and describe it in ``model.json``.

The folder an export writes (what ``examples/edge_predict.py --model DIR`` reads)::

    model.onnx     image -> logits, probabilities, feature_maps, gradcam, cam_class
    predict.onnx   image -> logits, probabilities (the same weights, nothing else computed)
    model.json     classes, input size and preprocessing, outputs, layers, opset, parity

Both graphs come from torch's dynamo exporter (``torch.onnx.export(..., dynamo=True)``) at
:data:`OPSET` with a dynamic batch axis, and both are run through onnxruntime on real images
before the folder is kept: any logit or probability further than :data:`TOLERANCE` from torch's,
any map further than :data:`MAP_TOLERANCE`, or a different label, fails the export (:class:`ExportError`), never a silent copy.
The CAM is held to that tolerance on the images whose CAM float32 rounding cannot move (no near
tie in a max-pool window on its gradient's path, :func:`kdray.edge.graph.near_tie_images`); at
least a quarter of the images must be such, and the others' difference is reported, not judged.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdray.edge.graph import OUTPUTS, EdgeStudent, near_tie_images
from kdray.explain.cam_methods import CAM_TITLES, PAPER_METHOD
from kdray.explain.gradcam import default_cam_layer, grad_cam
from kdray.explain.layer_maps import feature_maps
from kdray.models import ModelSpec, StudentCNN

__all__ = [
    "CARD_FILE",
    "EXPLAIN_FILE",
    "OPSET",
    "PREDICT_FILE",
    "MAP_TOLERANCE",
    "TOLERANCE",
    "EdgeExport",
    "ExportError",
    "Parity",
    "cam_difference",
    "check_parity",
    "enough_clear",
    "export_student",
    "session",
]

OPSET = 20  # ONNX opset: onnxruntime >= 1.17 runs it; torch 2.14's dynamo exporter's default
TOLERANCE = 1e-4  # logits and probabilities
# Feature maps and CAMs are scaled to [0, 1] per image and drawn in 8 bits (a grey level is
# 1/255, 3.9e-3): 1e-3 is a quarter of one. The per-image scaling divides by the map's own
# maximum, which amplifies float32 rounding where that maximum is small: a block1 HiResCAM at
# 64 px came out 3.8e-4 off with logits 4e-6 off (configs/paper.yaml, 2026-12-06).
MAP_TOLERANCE = 1e-3
EXPLAIN_FILE = "model.onnx"
PREDICT_FILE = "predict.onnx"
CARD_FILE = "model.json"
FORMAT = "kdray-edge/1"
PREPROCESS = (
    "decode the first frame; 16-bit or float gray min-max scaled to 0-255; RGB; bilinear resize "
    "(Pillow) to image_size x image_size; uint8, channels first. No normalisation: the graph "
    "divides by 255 and applies the ImageNet mean and std itself."
)
_DESCRIBE = {
    "logits": ("float32", ["N", "K"], "class scores"),
    "probabilities": ("float32", ["N", "K"], "softmax of the logits"),
    "feature_maps": (
        "float32",
        ["N", "L", "H", "W"],
        "channel-mean activation of each block (feature_layers order), bilinear to the input "
        "size, min-max scaled to [0, 1]; a constant map is 0",
    ),
    "gradcam": (
        "float32",
        ["N", "H", "W"],
        "the class activation map (cam_method: HiResCAM, Grad-CAM, ...) of the predicted class "
        "at cam_layer, in [0, 1] at the input size; all zero when no location adds positive "
        "evidence",
    ),
    "cam_class": ("int64", ["N"], "the class each CAM explains (the predicted one)"),
}


# torch.export traces through process-wide state (dynamo's caches, the loggers quietened below):
# datasets whose pipelines run at once (ray.max_concurrent_datasets) export one at a time.
_EXPORT_LOCK = threading.Lock()


class ExportError(RuntimeError):
    """The exported graph does not reproduce the torch model (or could not be exported).

    ``parity`` holds the differences when the graphs exported but did not match.
    """

    def __init__(self, message: str, parity: Parity | None = None) -> None:
        super().__init__(message)
        self.parity = parity


@dataclass
class Parity:
    """Largest absolute differences between onnxruntime and torch on ``images`` images.

    ``gradcam`` is the CAM's on the images without a near tie (:func:`cam_difference`);
    ``near_tie_images`` counts the others and ``gradcam_near_ties`` is their largest difference,
    reported, not judged; fewer than a quarter of the images without one fails the check (too
    few left to hold the CAM to the tolerance: :func:`enough_clear`).
    """

    images: int
    logits: float
    probabilities: float
    feature_maps: float
    gradcam: float
    labels_equal: bool
    tolerance: float = TOLERANCE
    map_tolerance: float = MAP_TOLERANCE
    near_tie_images: int = 0
    gradcam_near_ties: float = 0.0

    @property
    def cam_checked(self) -> bool:
        """Were enough images free of near ties to hold the CAM to its tolerance?"""
        return enough_clear(self.images, self.near_tie_images)

    @property
    def ok(self) -> bool:
        return (
            self.labels_equal
            and self.cam_checked
            and max(self.logits, self.probabilities) <= self.tolerance
            and max(self.feature_maps, self.gradcam) <= self.map_tolerance
        )

    def describe(self) -> str:
        text = (
            f"max |Δ| on {self.images} images: logits {self.logits:.1e}, probabilities "
            f"{self.probabilities:.1e}, feature maps {self.feature_maps:.1e}, CAM "
            f"{self.gradcam:.1e} (tolerance {self.tolerance:g}, maps {self.map_tolerance:g}); labels "
            f"{'equal' if self.labels_equal else 'DIFFER'}"
        )
        if self.near_tie_images:
            text += (
                f"; {self.near_tie_images} images with a near tie in a max-pool window on the CAM's "
                f"gradient path, where float32 rounding can move the CAM (CAM {self.gradcam_near_ties:.1e} "
                "there, not judged)"
            )
        if not self.cam_checked:
            text += "; fewer than a quarter of the images left to hold the CAM to its tolerance"
        return text


@dataclass
class EdgeExport:
    directory: Path
    card: dict[str, Any]
    parity: Parity
    seconds: float


class _Predict(nn.Module):
    """uint8 image -> logits, probabilities: the predict path, without the explanations."""

    def __init__(self, student: StudentCNN) -> None:
        super().__init__()
        self.student = student.eval()

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = self.student(image.to(torch.float32) / 255.0)
        return logits, torch.softmax(logits, dim=1)


# The explain graph's sessions run onnxruntime's basic graph optimisations only: the extended
# ones (layout transforms, convolution fusions) change the hand-written backward of a deep CAM
# layer (measured: Grad-CAM at block1 of a 64 px student off by 1e-2, HiResCAM by 3e-4; with the
# basic level 5e-6 and 4e-7). The predict graph has no backward: all optimisations.
EXPLAIN_OPTIMIZATION = "basic"


def session(path: str | Path, threads: int | None = None, optimization: str | None = None) -> Any:
    """An onnxruntime CPU session (``threads`` intra-op threads; None: onnxruntime's default).

    Args:
        optimization: ``basic`` or ``all`` graph optimisations; default ``basic`` for the explain
            graph (:data:`EXPLAIN_OPTIMIZATION`), ``all`` for any other.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    level = optimization or (EXPLAIN_OPTIMIZATION if Path(path).name == EXPLAIN_FILE else "all")
    options.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _export(module: nn.Module, example: torch.Tensor, outputs: list[str], path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    # The exporter's optimiser logs each rewrite at INFO (a hundred lines an export).
    quiet = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir")]
    with _EXPORT_LOCK, warnings.catch_warnings():  # and the exporter's notes on its internals
        levels = [q.level for q in quiet]
        for q in quiet:
            q.setLevel(logging.WARNING)
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                opset_version=OPSET,
                input_names=["image"],
                output_names=outputs,
                dynamic_shapes=({0: batch},),
                verbose=False,
            )
        except Exception as exc:
            raise ExportError(f"torch.onnx.export failed: {str(exc).splitlines()[0]}") from exc
        finally:
            for q, level in zip(quiet, levels, strict=True):
                q.setLevel(level)
    program.save(str(path))


# The CAM is held to MAP_TOLERANCE on the images without a near tie; at least this share of them
# (and one) must be such. A wrong graph is wrong on every image, so a quarter of 64 finds it;
# near ties are the model's: 30 of 64 test images of the default run's eye_disease champion.
MIN_CLEAR_SHARE = 0.25


def enough_clear(images: int, near_tie_images: int) -> bool:
    """Are enough of ``images`` free of near ties for the CAM check (:data:`MIN_CLEAR_SHARE`)?"""
    clear = images - near_tie_images
    return clear >= 1 and clear >= MIN_CLEAR_SHARE * images


def cam_difference(
    model: StudentCNN, cam_layer: str, images: np.ndarray, got: np.ndarray, want: np.ndarray
) -> tuple[float, int, float]:
    """Two CAM batches of uint8 ``images`` compared where the CAM is defined to float32 precision.

    Returns:
        (largest |Δ| on the images without a near tie (:func:`kdray.edge.graph.near_tie_images`,
        CAM at ``cam_layer``), how many images had one, the largest |Δ| on those).
    """
    cam_block = model.block_names.index(cam_layer) + 1
    near = near_tie_images(model, torch.from_numpy(np.ascontiguousarray(images)), cam_block)
    near = near.numpy()
    per_image = np.abs(np.asarray(got) - np.asarray(want)).reshape(len(near), -1).max(1)
    clear = per_image[~near]
    return (
        float(clear.max()) if clear.size else 0.0,
        int(near.sum()),
        float(per_image[near].max()) if near.any() else 0.0,
    )


def check_parity(
    model: StudentCNN,
    cam_layer: str,
    directory: str | Path,
    images: np.ndarray,
    cam_method: str = PAPER_METHOD,
) -> Parity:
    """Both exported graphs against torch (kdray's own explainers: pytorch-grad-cam's class for
    the CAM variant) on uint8 (N, 3, S, S) images; the CAM as :func:`cam_difference` compares it."""
    directory = Path(directory)
    x = np.ascontiguousarray(images, dtype=np.uint8)
    fm = feature_maps(model, x)
    cam = grad_cam(model, x, cam_layer, None, cam_method)
    ref_prob = torch.softmax(torch.from_numpy(fm.logits), 1).numpy()
    out = dict(zip(OUTPUTS, session(directory / EXPLAIN_FILE).run(None, {"image": x}), strict=True))
    logits, probs = session(directory / PREDICT_FILE).run(None, {"image": x})
    labels = fm.logits.argmax(1)
    gradcam, near, gradcam_near = cam_difference(model, cam_layer, x, out["gradcam"], cam.maps)
    return Parity(
        images=len(x),
        logits=float(
            max(np.abs(out["logits"] - fm.logits).max(), np.abs(logits - fm.logits).max())
        ),
        probabilities=float(
            max(np.abs(out["probabilities"] - ref_prob).max(), np.abs(probs - ref_prob).max())
        ),
        feature_maps=float(np.abs(out["feature_maps"] - fm.maps).max()),
        gradcam=gradcam,
        near_tie_images=near,
        gradcam_near_ties=gradcam_near,
        labels_equal=bool(
            (out["logits"].argmax(1) == labels).all()
            and (logits.argmax(1) == labels).all()
            and (out["cam_class"] == cam.targets).all()
        ),
    )


def _card(
    spec: ModelSpec, model: StudentCNN, cam_layer: str, cam_method: str, parity: Parity
) -> dict[str, Any]:
    import onnxruntime

    size = spec.image_size
    return {
        "format": FORMAT,
        "dataset": spec.dataset,
        "class_names": list(spec.class_names),
        "image_size": size,
        "widths": list(spec.widths),
        "input": {
            "name": "image",
            "dtype": "uint8",
            "shape": ["N", 3, size, size],
            "preprocess": PREPROCESS,
        },
        "files": {"explain": EXPLAIN_FILE, "predict": PREDICT_FILE},
        "outputs": {
            name: {"dtype": d, "shape": s, "description": text}
            for name, (d, s, text) in _DESCRIBE.items()
        },
        "feature_layers": list(model.block_names),
        "cam_layer": cam_layer,
        "cam_method": cam_method,
        "cam_note": f"{CAM_TITLES[cam_method]} of the predicted class; the class gradient "
        "written out in the graph (exact: conv, eval BatchNorm, ReLU, max-pool, average pool and "
        "linear head)",
        "opset": OPSET,
        # What a session of the explain graph must use to reproduce the parity below.
        "explain_graph_optimization": EXPLAIN_OPTIMIZATION,
        "exporter": f"torch {torch.__version__} (dynamo)",
        "checked_with": f"onnxruntime {onnxruntime.__version__}",
        "parity": asdict(parity),
    }


def export_student(
    model: StudentCNN,
    spec: ModelSpec,
    out_dir: str | Path,
    images: np.ndarray,
    cam_layer: str | None = None,
    source: dict[str, Any] | None = None,
    cam_method: str = PAPER_METHOD,
) -> EdgeExport:
    """Export ``model`` into ``out_dir`` (replaced whole, only once the parity check passed).

    Args:
        model: a trained student (left in eval mode, weights untouched).
        spec: its spec (classes, input size, dataset).
        images: uint8 (N, 3, S, S) images to check parity on (e.g. 64 of the test split).
        cam_layer: the block the CAM reads; default ``default_cam_layer``.
        source: where the weights came from (registered name, version, run), kept in the card.
        cam_method: the CAM variant the graph computes (the model's own, its ``cam.json``).

    Raises:
        ExportError: export failed, or onnxruntime's outputs differ from torch's (the reason
            names the output and the difference).
    """
    if not isinstance(model, StudentCNN):
        raise ExportError(f"only the student exports; got {type(model).__name__}")
    started = time.perf_counter()
    model = model.eval()
    layer = cam_layer or default_cam_layer(model, spec.image_size)
    if layer not in model.block_names:
        raise ExportError(f"cam_layer {layer!r} is not one of {model.block_names}")
    size = spec.image_size
    example = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".export-") as tmp:
        work = Path(tmp)
        cam_block = model.block_names.index(layer) + 1
        edge = EdgeStudent(model, cam_block, cam_method)
        _export(edge, example, list(OUTPUTS), work / EXPLAIN_FILE)
        _export(_Predict(model), example, ["logits", "probabilities"], work / PREDICT_FILE)
        parity = check_parity(model, layer, work, images, cam_method)
        if not parity.ok:
            raise ExportError(f"the ONNX graphs do not match torch: {parity.describe()}", parity)
        card = _card(spec, model, layer, cam_method, parity)
        if source:
            card["source"] = dict(source)
        (work / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        work.rename(out_dir)
        out_dir.chmod(0o755)  # mkdtemp's 0700 would hide the model from other users
        # TemporaryDirectory's cleanup of the moved folder: make it find an empty one.
        work.mkdir()
    return EdgeExport(out_dir, card, parity, time.perf_counter() - started)
