"""Score a batch of image files with student and teacher: the work each audit actor does.

:func:`score_batch` is the whole per-image computation (decode with kdray's decoder, forward,
feature maps and the CAM at the report's layer, SHAP on the sampled rows, the scores); the Ray
Data actor (:class:`AuditScorer`) and the benchmark's plain loop both call it, so they compare
the same work. The maps are computed exactly as the transparency report computes them
(:func:`kdray.explain.layer_maps.feature_maps` and :func:`kdray.explain.gradcam.grad_cam` with
the model's own CAM variant and layer, :func:`kdray.explain.gradcam.resolve_cam`), so numbers on
the same split match the report's.

Rows come back as a pyarrow table: plain Parquet types (lists, binary), readable without Ray.
Each feature map and Grad-CAM is stored as uint8 at the resolution of the layer it comes from
(its native resolution: 16x16 for a student block at 64 px), enough for a viewer to draw any
row; SHAP, pixel-level and signed, at the input size with its scale (``<role>_shap_scale``).
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from kdray.config import ExplainConfig
from kdray.data.folders import read_mask
from kdray.data.images import ImageError, read_image
from kdray.explain.agreement import TOP_FRACTION, rank_correlation, top_overlap
from kdray.explain.cam_methods import CAM_FILE
from kdray.explain.expected_gradients import shap_maps
from kdray.explain.faithfulness import energy_in_mask, pointing_game
from kdray.explain.gradcam import cam_layer, grad_cam, layer_output_size, resolve_cam
from kdray.explain.layer_maps import feature_maps
from kdray.models import ModelSpec, load_model_files

__all__ = [
    "CHEAP_METHODS",
    "AuditModel",
    "AuditScorer",
    "Settings",
    "decode_map",
    "decode_signed",
    "limit_threads",
    "load_audit_model",
    "map_at",
    "thumbnail_at",
    "score_batch",
]

CHEAP_METHODS = ("feature_maps", "gradcam")  # one pass per image; SHAP costs shap_nsamples
THUMB_SIDE = 96  # the stored input thumbnail (the viewer draws maps over it)


@dataclass(frozen=True)
class Settings:
    """What each actor needs to know besides the models (picklable)."""

    methods: tuple[str, ...] = CHEAP_METHODS  # any of feature_maps, gradcam, shap
    explain: ExplainConfig = field(default_factory=ExplainConfig)  # layers, top-k, SHAP samples
    seed: int = 0
    threads: int = 1  # torch threads per actor: the CPUs Ray gave it


@dataclass
class AuditModel:
    """One loaded model with what scoring it needs."""

    role: str  # "student" or "teacher"
    model: nn.Module
    spec: ModelSpec
    layer: str  # the CAM's block, and the feature map scored
    side: tuple[int, int]  # that block's output (H, W): the stored maps' resolution
    background: np.ndarray | None  # SHAP background, uint8 (B, 3, S, S)
    method: str = "gradcam"  # the CAM variant (kdray.explain.cam_methods)
    feature_layer: str = ""  # the scored feature map's block (the report's): "" = ``layer``


def load_audit_model(
    role: str,
    files: dict[str, bytes],
    background: np.ndarray | None,
    cfg: ExplainConfig,
    device: torch.device | str = "cpu",
) -> AuditModel:
    """Build a model from :func:`kdray.models.model_files` bytes (they travel to any node)."""
    model, spec = load_model_files(files, device)
    size = int(spec.image_size)
    # The model's measured CAM (cam.json, when its folder has one), as the report reads it.
    choice = json.loads(files[CAM_FILE]) if CAM_FILE in files else None
    cam = resolve_cam(
        role, model, cfg, size, (choice["method"], choice["layer"]) if choice else None
    )
    return AuditModel(
        role,
        model,
        spec,
        cam.layer,
        layer_output_size(model, cam.layer, size),
        background,
        cam.method,
        cam_layer(role, model, cfg, size),  # the feature maps' block, as the report scores it
    )


def decode_map(data: bytes, side: tuple[int, int] | list[int]) -> np.ndarray:
    """A stored map (uint8 bytes) back to float (H, W) in [0, 1]."""
    h, w = int(side[0]), int(side[1])
    return np.frombuffer(data, dtype=np.uint8).reshape(h, w).astype(np.float32) / 255.0


def thumbnail_at(data: bytes, side: int) -> np.ndarray:
    """A stored thumbnail as uint8 RGB (side, side, 3), bilinear."""
    pil = Image.open(io.BytesIO(data)).convert("RGB")
    if pil.size != (side, side):
        pil = pil.resize((side, side), Image.Resampling.BILINEAR)
    return np.asarray(pil)


def map_at(data: bytes, map_side: tuple[int, int] | list[int], side: int) -> np.ndarray:
    """A stored map (:func:`decode_map`) upsampled to float (side, side) in [0, 1], bilinear,
    to draw over :func:`thumbnail_at`."""
    small = Image.fromarray((decode_map(data, map_side) * 255).astype(np.uint8))
    return np.asarray(small.resize((side, side), Image.Resampling.BILINEAR), np.float32) / 255.0


def _native(maps: np.ndarray, side: tuple[int, int]) -> list[bytes]:
    """(N, S, S) maps in [0, 1] -> uint8 bytes at the layer's resolution (area average)."""
    if len(maps) == 0:
        return []
    small = F.adaptive_avg_pool2d(torch.from_numpy(np.ascontiguousarray(maps))[:, None], side)
    q = (small[:, 0].clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
    return [row.tobytes() for row in q]


def _signed(maps: np.ndarray) -> tuple[list[bytes], np.ndarray]:
    """Signed (N, S, S) attributions -> uint8 bytes (127.5 is zero) and each map's max |value|."""
    scale = np.abs(maps).reshape(len(maps), -1).max(1)
    safe = np.where(scale > 0, scale, 1.0)[:, None, None]
    q = np.clip(np.round(127.5 + 127.5 * maps / safe), 0, 255).astype(np.uint8)
    return [row.tobytes() for row in q], scale.astype(np.float64)


def decode_signed(data: bytes, side: int, scale: float) -> np.ndarray:
    """A stored SHAP map back to float (side, side) attributions."""
    q = np.frombuffer(data, dtype=np.uint8).reshape(side, side).astype(np.float32)
    return (q / 127.5 - 1.0) * float(scale)


def _thumb(image: np.ndarray) -> bytes:
    pil = Image.fromarray(image.transpose(1, 2, 0))
    if max(pil.size) > THUMB_SIDE:
        pil = pil.resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    pil.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _decode(paths: list[str], masks: list[str], size: int) -> tuple[list, list, list[str]]:
    images: list[np.ndarray | None] = []
    mask_arrays: list[np.ndarray | None] = []
    notes: list[str] = []
    for path, mask in zip(paths, masks, strict=True):
        note = ""
        try:
            images.append(read_image(path, size))
        except ImageError as exc:
            images.append(None)
            note = exc.reason
        m = None
        if mask and images[-1] is not None:
            try:
                m = read_mask(mask, size)
            except (OSError, ValueError) as exc:  # the image is audited, the mask is not
                note = f"lesion mask unreadable ({exc})"
        mask_arrays.append(m)
        notes.append(note)
    return images, mask_arrays, notes


def _scores(m: AuditModel, x: torch.Tensor, shap_rows: np.ndarray, s: Settings) -> dict:
    """Probabilities, the maps of each method (N, S, S; SHAP only on ``shap_rows``)."""
    cfg = s.explain
    x = x.to(next(m.model.parameters()).device)  # a GPU actor's model lives on its GPU
    fm = feature_maps(m.model, x, [m.feature_layer or m.layer], cfg.top_k_channels)
    preds = fm.logits.argmax(1)
    probs = torch.softmax(torch.from_numpy(fm.logits).double(), dim=1).numpy()
    maps: dict[str, np.ndarray] = {}
    if "feature_maps" in s.methods:
        maps["feature_maps"] = fm.maps[:, 0]
    if "gradcam" in s.methods:
        maps["gradcam"] = grad_cam(m.model, x, m.layer, preds, m.method).maps
    if "shap" in s.methods and len(shap_rows) and m.background is not None:
        maps["shap"] = shap_maps(
            m.model,
            x[shap_rows],
            m.background,
            preds[shap_rows],
            cfg.shap_nsamples,
            seed=s.seed,
        ).maps
    return {"preds": preds, "probs": probs, "maps": maps}


def score_batch(
    models: list[AuditModel], batch: dict[str, np.ndarray], s: Settings, node: str = ""
) -> pa.Table:
    """Decode and score one batch of :class:`kdray.audit.sources.Item` rows.

    Unreadable files become rows with their reason in ``error`` (labels -1, scores NaN). Each
    row also records when its batch finished (``scored_at``, epoch seconds) and how long the
    batch took (``batch_seconds``).
    """
    started = time.time()
    n = len(batch["index"])
    size = int(models[0].spec.image_size)
    images, masks, notes = _decode(list(batch["path"]), list(batch["mask"]), size)
    ok = np.array([im is not None for im in images], dtype=bool)
    good = np.flatnonzero(ok)
    errors = ["" if ok[i] else notes[i] for i in range(n)]
    notes = [notes[i] if ok[i] else "" for i in range(n)]
    has_mask = np.array([m is not None and bool(m.any()) for m in masks], dtype=bool)
    cols: dict[str, object] = {
        "index": pa.array(batch["index"].astype(np.int64)),
        "name": pa.array([str(v) for v in batch["name"]]),
        "path": pa.array([str(v) for v in batch["path"]]),
        "split": pa.array([str(v) for v in batch["split"]]),
        "label": pa.array(batch["label"].astype(np.int64)),
        "error": pa.array(errors),
        "note": pa.array(notes),
        "node": pa.array([node] * n),
        "has_mask": pa.array(has_mask),
        "thumbnail": pa.array([_thumb(images[i]) if ok[i] else b"" for i in range(n)], pa.binary()),
    }
    shap_flag = np.asarray(batch["shap"], dtype=bool) & ok
    x = torch.from_numpy(np.stack([images[i] for i in good])) if len(good) else None
    shap_rows = np.flatnonzero(shap_flag[good])  # positions within the decoded images
    scored_masks = (
        np.stack([masks[i] if masks[i] is not None else np.zeros((size, size), bool) for i in good])
        if len(good)
        else np.zeros((0, size, size), bool)
    )
    results: dict[str, dict] = {}
    for m in models:
        r = _scores(m, x, shap_rows, s) if x is not None else {"maps": {}}
        results[m.role] = r
        role = m.role
        num_classes = len(m.spec.class_names)
        probs = np.full((n, num_classes), np.nan)
        labels = np.full(n, -1, dtype=np.int64)
        if x is not None:
            probs[good] = r["probs"]
            labels[good] = r["preds"]
        top2 = np.sort(np.nan_to_num(probs, nan=0.0), axis=1)[:, ::-1]
        with np.errstate(divide="ignore", invalid="ignore"):
            entropy = -(probs * np.log(np.clip(probs, 1e-12, 1.0))).sum(1)
        cols[f"{role}_label"] = pa.array(labels)
        cols[f"{role}_probs"] = pa.array(
            [None if not ok[i] else probs[i].astype(np.float32).tolist() for i in range(n)],
            pa.list_(pa.float32()),
        )
        cols[f"{role}_confidence"] = pa.array(np.where(ok, top2[:, 0], np.nan))
        cols[f"{role}_margin"] = pa.array(
            np.where(ok, top2[:, 0] - (top2[:, 1] if num_classes > 1 else 0.0), np.nan)
        )
        cols[f"{role}_entropy"] = pa.array(np.where(ok, entropy, np.nan))
        cols[f"{role}_map_side"] = pa.array([list(m.side)] * n, pa.list_(pa.int32()))
        for method in s.methods:
            maps = r["maps"].get(method)
            rows = good if method != "shap" else good[shap_rows]
            stored = [b""] * n
            pg = np.full(n, np.nan)
            em = np.full(n, np.nan)
            scale = np.full(n, np.nan)
            if maps is not None and len(rows):
                if method == "shap":  # signed, pixel-level: stored at the input size
                    encoded, scale[rows] = _signed(maps)
                else:
                    encoded = _native(maps, m.side)
                for i, data in zip(rows, encoded, strict=True):
                    stored[i] = data
                mk = scored_masks if method != "shap" else scored_masks[shap_rows]
                pg[rows] = pointing_game(maps, mk)
                em[rows] = energy_in_mask(maps, mk)
            cols[f"{role}_{method}"] = pa.array(stored, pa.binary())
            cols[f"{role}_{method}_pointing"] = pa.array(pg)
            cols[f"{role}_{method}_energy"] = pa.array(em)
            if method == "shap":
                cols[f"{role}_shap_scale"] = pa.array(scale)
    if "teacher" in results and "student" in results:
        t, st = results["teacher"], results["student"]
        agree = np.zeros(n, dtype=bool)
        if x is not None:
            agree[good] = t["preds"] == st["preds"]
        cols["agree"] = pa.array(agree)
        for method in s.methods:
            rank = np.full(n, np.nan)
            iou = np.full(n, np.nan)
            tm, sm = t["maps"].get(method), st["maps"].get(method)
            if tm is not None and sm is not None and len(tm):
                rows = good if method != "shap" else good[shap_rows]
                rank[rows] = rank_correlation(tm, sm)
                iou[rows] = top_overlap(tm, sm, TOP_FRACTION)
            cols[f"maps_rank_{method}"] = pa.array(rank)
            cols[f"maps_iou_{method}"] = pa.array(iou)
    finished = time.time()  # wall clock: comparable across actors and nodes
    cols["scored_at"] = pa.array([finished] * n)
    cols["batch_seconds"] = pa.array([finished - started] * n)
    return pa.table(cols)


def limit_threads(threads: int) -> None:
    """Hold this process to ``threads`` CPUs: torch's, OpenCV's (pytorch-grad-cam resizes with
    it) and every BLAS / OpenMP pool numpy and scipy load. An actor that reserved one CPU but
    let OpenCV and OpenBLAS spread over the machine measured 1.3x faster alone and then slowed
    its neighbour: two such actors did 1.28x the images of one instead of about 2x."""
    import cv2
    from threadpoolctl import threadpool_limits

    n = max(1, int(threads))
    torch.set_num_threads(n)
    cv2.setNumThreads(n)
    threadpool_limits(n)


class AuditScorer:
    """The Ray Data actor: loads student (and teacher) once, then scores batches.

    Args:
        models: role -> (:func:`kdray.models.model_files` bytes, SHAP background or None), or
            an object ref to that (how the driver ships them: once, to any node).
        settings: :class:`Settings`; ``threads`` torch threads (the actor's CPUs).
    """

    def __init__(self, models: dict | object, settings: Settings) -> None:
        import ray

        if isinstance(models, ray.ObjectRef):  # the driver put the weights in the object store
            models = ray.get(models)
        limit_threads(settings.threads)
        self.settings = settings
        from kdray.devices import assigned_device

        device = assigned_device()  # cuda:0 where Ray gave this actor a GPU
        self.models = [
            load_audit_model(role, files, background, settings.explain, device)
            for role, (files, background) in models.items()
        ]
        self.node = _node_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        return score_batch(self.models, batch, self.settings, self.node)


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # outside a Ray worker
        return ""
