"""One call that explains one image: ``explain(model, image, methods=[...])`` -> :class:`Explanation`.

The result is a pydantic model meant to be returned as is by a serving endpoint:
``Explanation.to_json()`` gives lists and base64 PNGs (maps as nested lists only on request).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import (
    BaseModel,
    Field,
    PlainSerializer,
    PlainValidator,
    WithJsonSchema,
)
from torch import nn

from kdray.config import ExplainConfig
from kdray.explain.agreement import blank_maps
from kdray.explain.background import load_background
from kdray.explain.cam_methods import CAM_TITLES, check_method
from kdray.explain.expected_gradients import shap_maps
from kdray.explain.gradcam import grad_cam
from kdray.explain.hooks import eval_mode, model_lock
from kdray.explain.inputs import ImageLike, display_images, to_batch
from kdray.explain.layer_maps import feature_maps
from kdray.explain.render import (
    heat_layer,
    heat_overlay,
    png_bytes,
    signed_layer,
    signed_overlay,
    strip,
)
from kdray.models import TeacherDenseNet, load_model

__all__ = ["METHODS", "Explainer", "Explanation", "LayerMap", "MethodResult", "explain"]

Method = Literal["feature_maps", "gradcam", "shap"]
METHODS: tuple[str, ...] = ("feature_maps", "gradcam", "shap")

Array2D = Annotated[
    np.ndarray,
    PlainValidator(lambda v: np.asarray(v, dtype=np.float32)),
    PlainSerializer(lambda a: np.asarray(a).tolist(), return_type=list),
    WithJsonSchema({"type": "array", "items": {"type": "array", "items": {"type": "number"}}}),
]


def _png_from(value: Any) -> bytes:
    """bytes as they are; a base64 string (standard or URL-safe alphabet) decoded."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str):
        return base64.b64decode(value.replace("-", "+").replace("_", "/"), validate=True)
    raise ValueError(f"expected PNG bytes or a base64 string, got {type(value).__name__}")


# PNG files: bytes in Python, standard base64 in JSON (what a data: URI or any decoder takes;
# pydantic's own "base64" is the URL-safe alphabet).
PngBytes = Annotated[
    bytes,
    PlainValidator(_png_from),
    PlainSerializer(
        lambda b: base64.b64encode(b).decode("ascii"), return_type=str, when_used="json"
    ),
    WithJsonSchema(
        {"type": "string", "contentEncoding": "base64", "contentMediaType": "image/png"}
    ),
]


class LayerMap(BaseModel):
    """One map: the layer it was taken at, its images as PNG, and (optionally) the array.

    Attributes:
        png: the map blended over the input (heat maps at opacity 0.5); ``render`` overlay|both.
        heat_png: the map alone (RGB ``jet`` for heat maps, RGBA for SHAP), to draw over
            ``Explanation.input_png`` at an opacity of the viewer's choice; ``render`` layer|both.
        blank: the map is constant (zero everywhere): it points nowhere. For a class activation
            map, no positive evidence for the target class at this layer (the ReLU of a sum that
            is negative everywhere); the viewer says so instead of drawing it.
        note: why a map is blank, in a sentence (None when it is not).
    """

    layer: str
    png: PngBytes | None = None
    heat_png: PngBytes | None = None
    array: Array2D | None = None
    blank: bool = False
    note: str | None = None


class MethodResult(BaseModel):
    """One method's output.

    Attributes:
        method: ``feature_maps``, ``gradcam`` (the class activation map, of the variant
            ``cam_method`` names) or ``shap``.
        cam_method: for ``gradcam``: the variant computed (:mod:`kdray.explain.cam_methods`:
            ``hirescam``, ``gradcam`` the paper's, ``layercam``, ``gradcampp``, ``xgradcam``).
        time_ms: compute time of the maps (the forward/backward passes), not the rendering.
        render_ms: time spent drawing overlays and encoding PNGs.
        signed: True for SHAP (red positive, blue negative); False for [0, 1] heat maps.
        maps: one per layer (feature maps: first block to last), else exactly one.
        grid_png: feature maps only: the input then layer 1..n side by side.
    """

    method: Method
    cam_method: str | None = None
    time_ms: float
    render_ms: float
    signed: bool
    maps: list[LayerMap]
    grid_png: PngBytes | None = None


class Explanation(BaseModel):
    """Prediction and explanations of one image."""

    prediction: int
    class_name: str | None
    probabilities: list[float]
    target: int
    target_name: str | None
    image_size: tuple[int, int]
    input_png: PngBytes = Field(description="the model input as PNG (what the maps are drawn over)")
    methods: dict[str, MethodResult]
    total_ms: float

    def to_json(self, include_arrays: bool = False) -> str:
        """JSON text: lists, base64 PNGs; the maps' float arrays only when asked for."""
        return self.model_dump_json(exclude=None if include_arrays else _ARRAYS)

    def to_dict(self, include_arrays: bool = False) -> dict[str, Any]:
        """The JSON-able dict of :meth:`to_json` (what a web endpoint returns)."""
        return self.model_dump(mode="json", exclude=None if include_arrays else _ARRAYS)


_ARRAYS = {"methods": {"__all__": {"maps": {"__all__": {"array"}}}}}


def _cam_layer(model: nn.Module, cfg: ExplainConfig) -> str | None:
    return cfg.teacher_layer if isinstance(model, TeacherDenseNet) else cfg.student_layer


def _blank_note(method: str, cam_method: str | None, layer: str) -> str:
    if method == "gradcam":
        return (
            f"{CAM_TITLES.get(cam_method or '', 'the CAM')} is zero everywhere at {layer}: no "
            "position there adds positive evidence for this class (the ReLU of a sum that is "
            "negative everywhere); it points nowhere"
        )
    return f"the map is constant at {layer}: it points nowhere"


def _name(class_names: Sequence[str] | None, index: int) -> str | None:
    return class_names[index] if class_names and 0 <= index < len(class_names) else None


def _predict(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with model_lock(model), eval_mode(model), torch.no_grad():
        return model(x).float().numpy()


Render = Literal["overlay", "layer", "both", "none"]
_RENDER_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kdray-render")


def _render(
    method: str,
    arrays: list[tuple[str, np.ndarray]],
    shown: np.ndarray,
    include_arrays: bool,
    render: Render,
    grid: bool,
    cam_method: str | None = None,
) -> tuple[list[LayerMap], bytes | None]:
    """The maps as PNG: overlays and/or the maps alone (and, for feature maps, the strip)."""
    signed = method == "shap"
    want_overlay = render in ("overlay", "both") or (grid and method == "feature_maps")

    def draw(a: np.ndarray) -> tuple[np.ndarray | None, bytes | None, bytes | None]:
        overlay = (
            (signed_overlay(shown, a) if signed else heat_overlay(shown, a))
            if want_overlay
            else None
        )
        png = png_bytes(overlay) if render in ("overlay", "both") else None
        heat = (
            png_bytes(signed_layer(a) if signed else heat_layer(a))
            if render in ("layer", "both")
            else None
        )
        return overlay, png, heat

    # One map per pool thread: zlib and most of numpy's blending run without the GIL, so the
    # five feature maps' PNGs of a student encode side by side.
    drawn = (
        list(_RENDER_POOL.map(draw, [a for _, a in arrays]))
        if len(arrays) > 1
        else [draw(arrays[0][1])]
    )
    overlays = [d[0] for d in drawn] if want_overlay else None
    blanks = [bool(blank_maps(a[None])[0]) for _, a in arrays]
    maps = [
        LayerMap(
            layer=name,
            png=drawn[i][1],
            heat_png=drawn[i][2],
            array=a if include_arrays else None,
            blank=blanks[i],
            note=_blank_note(method, cam_method, name) if blanks[i] else None,
        )
        for i, (name, a) in enumerate(arrays)
    ]
    strip_png = None
    if grid and method == "feature_maps":
        tile = (shown * 255 + 0.5).astype(np.uint8)
        names = ["input", *[name.split(".")[-1] for name, _ in arrays]]
        strip_png = png_bytes(strip([tile, *overlays], names))
    return maps, strip_png


def _graph_applies(
    graph: Any,
    image: ImageLike,
    wanted: list[str],
    target: int | None,
    feature_layers: Sequence[str] | None,
    cam_layer: str | None,
    cfg: ExplainConfig,
    cam_method: str,
) -> bool:
    """The ONNX graph computes exactly what was asked: every block's mean map and the predicted
    class's CAM (its variant) at its own layer, from a uint8 (3, S, S) image."""
    if graph is None or target is not None or cfg.top_k_channels is not None:
        return False
    if cam_method != getattr(graph, "cam_method", "gradcam"):
        return False
    if not ({"feature_maps", "gradcam"} & set(wanted)):
        return False
    if feature_layers is not None and list(feature_layers) != graph.feature_layers:
        return False
    if cam_layer is not None and cam_layer != graph.cam_layer:
        return False
    array = np.asarray(image) if isinstance(image, np.ndarray) else None
    return array is not None and array.dtype == np.uint8 and array.ndim == 3


def explain(
    model: nn.Module,
    image: ImageLike,
    methods: Sequence[str] = METHODS,
    *,
    background: ImageLike | None = None,
    class_names: Sequence[str] | None = None,
    target: int | None = None,
    cfg: ExplainConfig | None = None,
    feature_layers: Sequence[str] | None = None,
    cam_layer: str | None = None,
    seed: int = 0,
    include_arrays: bool = True,
    render: Render = "both",
    grid: bool = True,
    graph: Any = None,
    cam_method: str | None = None,
) -> Explanation:
    """Predict one image and explain it with the requested methods.

    Methods run in the order feature maps, Grad-CAM, SHAP; the first forward pass also gives the
    prediction, so no method pays for an extra one.

    Args:
        model: a kdray model (teacher or student); left as found (mode, hooks, flags).
        image: one image, see :func:`kdray.explain.inputs.to_batch`.
        methods: any of ``feature_maps``, ``gradcam``, ``shap``.
        background: SHAP background images (required for ``shap``).
        class_names: label names, for ``class_name`` / ``target_name``.
        target: class to explain; None explains the prediction.
        cfg: layers, ``top_k_channels`` and SHAP ``nsamples`` (defaults: ``ExplainConfig()``).
        feature_layers: feature-map layers; default the model's blocks.
        cam_layer: the CAM's layer; default from ``cfg``, else ``default_cam_layer``.
        seed: SHAP sampling seed.
        include_arrays: keep the float maps in the result (``to_json`` drops them by default).
        render: per map, ``overlay`` (``png``: blended over the input), ``layer`` (``heat_png``:
            the map alone), ``both``, or ``none`` (no image: with ``include_arrays``, the arrays
            alone, and no rendering time spent).
        grid: feature maps: also the input + every layer as one strip (``grid_png``).
        graph: the student's ONNX explain graph (:class:`kdray.edge.runtime.OnnxExplainer`):
            feature maps of every block and Grad-CAM of the prediction in one onnxruntime pass
            (checked against these torch explainers when it was loaded). Used for a uint8 image
            when nothing asks for more (no ``target``, ``feature_layers``, ``top_k_channels``,
            the graph's CAM variant and layer); the two methods then share the pass's time, half
            each.
        cam_method: the CAM variant (:mod:`kdray.explain.cam_methods`); default
            ``cfg.cam_method``.

    Returns:
        :class:`Explanation`.

    Raises:
        ValueError: an unknown method, more than one image, or ``shap`` without a background.
    """
    cfg = cfg or ExplainConfig()
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(
            f"unknown explanation method(s) {unknown}; expected any of {list(METHODS)}"
        )
    wanted = [m for m in METHODS if m in methods]
    if "shap" in wanted and background is None:
        raise ValueError("method 'shap' needs background images (see kdray.explain.background)")
    x = to_batch(image)
    if x.shape[0] != 1:
        raise ValueError(f"explain() takes one image, got a batch of {x.shape[0]}")
    shown = display_images(x)[0]
    start = time.perf_counter()
    logits: np.ndarray | None = None
    results: dict[str, MethodResult] = {}
    layer_name = cam_layer or _cam_layer(model, cfg)
    variant = check_method(cam_method or cfg.cam_method)

    from_graph: dict[str, tuple[list[tuple[str, np.ndarray]], float]] = {}
    if _graph_applies(graph, image, wanted, target, feature_layers, layer_name, cfg, variant):
        t0 = time.perf_counter()
        g_logits, g_maps, g_cam = graph.run(np.asarray(image)[None])
        share = (time.perf_counter() - t0) / len([m for m in wanted if m != "shap"])
        logits = g_logits.astype(np.float32)
        from_graph["feature_maps"] = (
            list(zip(graph.feature_layers, g_maps[0], strict=True)),
            share,
        )
        from_graph["gradcam"] = ([(graph.cam_layer, g_cam[0])], share)

    def tgt() -> int | None:
        if target is not None:
            return int(target)
        return None if logits is None else int(logits[0].argmax())

    for method in wanted:
        t0 = time.perf_counter()
        if method in from_graph:
            arrays, seconds = from_graph[method]
            t0 -= seconds  # the share of the one pass that computed it
        elif method == "feature_maps":
            fm = feature_maps(model, x, feature_layers, cfg.top_k_channels)
            logits = fm.logits
            arrays = list(zip(fm.layers, fm.maps[0], strict=True))
        elif method == "gradcam":
            cm = grad_cam(model, x, layer_name, tgt(), variant)
            logits = cm.logits if logits is None else logits
            arrays = [(cm.layer, cm.maps[0])]
        else:
            logits = _predict(model, x) if logits is None else logits
            sm = shap_maps(model, x, background, tgt(), cfg.shap_nsamples, seed=seed)
            arrays = [("input", sm.maps[0])]
        t1 = time.perf_counter()
        maps, strip_png = _render(method, arrays, shown, include_arrays, render, grid, variant)
        results[method] = MethodResult(
            method=method,
            cam_method=variant if method == "gradcam" else None,
            time_ms=(t1 - t0) * 1e3,
            render_ms=(time.perf_counter() - t1) * 1e3,
            signed=method == "shap",
            maps=maps,
            grid_png=strip_png,
        )
    logits = _predict(model, x) if logits is None else logits
    probs = torch.softmax(torch.from_numpy(logits[0]), 0).numpy()
    pred = int(probs.argmax())
    explained = int(target) if target is not None else pred
    return Explanation(
        prediction=pred,
        class_name=_name(class_names, pred),
        probabilities=[float(p) for p in probs],
        target=explained,
        target_name=_name(class_names, explained),
        image_size=(x.shape[2], x.shape[3]),
        input_png=png_bytes((shown * 255.0 + 0.5).astype(np.uint8)),
        methods=results,
        total_ms=(time.perf_counter() - start) * 1e3,
    )


class Explainer:
    """A model with what explaining it needs: class names, SHAP background, config.

    Build it once (e.g. in a Ray Serve replica's ``__init__``) and call :meth:`explain` per
    request; calls from several threads are safe (work on one model is serialised).

    Args:
        model: a kdray model.
        class_names: label names.
        background: SHAP background (uint8 (B, 3, H, W)); None disables ``shap``.
        cfg: the ``explain`` section of the experiment config.
    """

    def __init__(
        self,
        model: nn.Module,
        class_names: Sequence[str] | None = None,
        background: ImageLike | None = None,
        cfg: ExplainConfig | None = None,
    ) -> None:
        self.model = model.eval()
        self.class_names = list(class_names) if class_names else None
        self.background = background
        self.cfg = cfg or ExplainConfig()

    @classmethod
    def from_dir(cls, directory: str | Path, cfg: ExplainConfig | None = None) -> Explainer:
        """Load a model saved by :func:`kdray.models.save_model` and the background beside it."""
        model, spec = load_model(directory)
        return cls(model, spec.class_names, load_background(directory), cfg)

    @property
    def methods(self) -> list[str]:
        """Configured methods this explainer can run (``shap`` only with a background)."""
        return [m for m in self.cfg.methods if m != "shap" or self.background is not None]

    def explain(
        self,
        image: ImageLike,
        methods: Sequence[str] | None = None,
        target: int | None = None,
        **kwargs: Any,
    ) -> Explanation:
        """:func:`explain` with this explainer's model, names, background and config."""
        return explain(
            self.model,
            image,
            self.methods if methods is None else methods,
            background=self.background,
            class_names=self.class_names,
            target=target,
            cfg=self.cfg,
            **kwargs,
        )
