"""The transparency report of one dataset: the paper's tables, measured, teacher vs student.

``build_report`` writes into ``out_dir``:

* ``report.md``: cost (parameters, FLOPs at the input size and at 224x224, mean execution time
  of each explanation method), localisation on the lesion masks, deletion / insertion AUC, each
  with a random-map baseline;
* ``explanations.png``: example rows, input | teacher maps | student maps, mask outlined;
* ``feature_maps.png``: one image through every block of both models;
* ``deletion_insertion.png``: mean deletion and insertion curves;
* teacher-student agreement: how often the student's label is the teacher's, and per method how
  alike their maps of the same image are (rank correlation, top-10 % overlap), against a random
  map (:mod:`kdray.explain.agreement`);
* ``reliability.png``: calibration on the whole test split (teacher, student, and the CE-only
  baseline when given), with each model's expected calibration error;
* ``learning_curves.png``: validation accuracy per epoch of teacher, KD champion and CE-only
  baseline, when given (does the teacher know more than the student learns alone?);
* ``sanity.png``: the sanity checks (``explain.sanity``, :mod:`kdray.explain.sanity_report`):
  each method's maps as the model is randomised from the output down, and the random-logit
  test; blank Grad-CAM maps counted (scored as misses);
* ``report.json``: the flat metrics.

The text is :mod:`kdray.explain.report_text`; each model's cost, timing and faithfulness numbers
are :mod:`kdray.explain.report_measures`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdray.config import ExplainConfig, TransparencyConfig
from kdray.data.prepare import PreparedData
from kdray.engine import predict_logits, softmax
from kdray.explain.agreement import (
    TOP_FRACTION,
    prediction_agreement,
    rank_correlation,
    top_overlap,
)
from kdray.explain.background import select_background, stratified_indices
from kdray.explain.cam_report import compare_cams
from kdray.explain.expected_gradients import shap_maps
from kdray.explain.faithfulness import nanmean, random_maps
from kdray.explain.figures import (
    Example,
    curves_figure,
    explanation_grid,
    feature_map_figure,
    learning_curves_figure,
    reliability_figure,
)
from kdray.explain.gradcam import Cam, cam_layer, grad_cam, layer_output_size, resolve_cam
from kdray.explain.inputs import display_images, to_batch
from kdray.explain.layer_maps import feature_maps
from kdray.explain.report_measures import ScoredMaps, localise_test_split, measure_model
from kdray.explain.report_text import CALIBRATION_LABELS, report_markdown, task_name
from kdray.explain.sanity_report import run_sanity_checks, sanity_figure
from kdray.metrics import calibration

__all__ = ["Report", "build_report", "feature_layer_index"]

MODELS = ("teacher", "student")


@dataclass
class Report:
    """What :func:`build_report` wrote and measured.

    Attributes:
        dataset: dataset id.
        markdown: the text of ``report.md``.
        paths: ``markdown``, ``json``, ``grid``, ``feature_maps``, ``curves``, ``reliability``
            -> file.
        metrics: flat ``name -> number`` (e.g. ``student.met_ms.shap``,
            ``teacher.pointing_game.gradcam``, ``ratio.flops``); NaN scores are left out.
    """

    dataset: str
    markdown: str
    paths: dict[str, Path]
    metrics: dict[str, float] = field(default_factory=dict)


def feature_layer_index(layers: list[str], cam_layer: str) -> int:
    """Which feature map the report scores: Grad-CAM's block if it is one of them, else the last."""
    return layers.index(cam_layer) if cam_layer in layers else len(layers) - 1


def _score_maps(
    model: nn.Module,
    cam: Cam,
    x: torch.Tensor,
    background: np.ndarray,
    cfg: ExplainConfig,
    seed: int,
    feature_layer: str | None = None,
) -> ScoredMaps:
    t0 = time.perf_counter()
    fm = feature_maps(model, x, None, cfg.top_k_channels)
    preds = fm.logits.argmax(1)
    maps: dict[str, np.ndarray] = {}
    if "feature_maps" in cfg.methods:
        # Scored at the deepest block of >= 7x7 (kdray.explain.gradcam.cam_layer): a 2x2 last
        # block at 64 px, upsampled, peaks in a corner and cannot localise anything; an early
        # block's channel mean mostly shows the input.
        layer = feature_layer or cam.layer
        maps["feature_maps"] = fm.maps[:, feature_layer_index(fm.layers, layer)]
    if "gradcam" in cfg.methods:
        maps["gradcam"] = grad_cam(model, x, cam.layer, preds, cam.method).maps
    if "shap" in cfg.methods:
        maps["shap"] = shap_maps(model, x, background, preds, cfg.shap_nsamples, seed=seed).maps
    return ScoredMaps(preds, fm.layers, fm.maps, maps, time.perf_counter() - t0)


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _agreement(scored: dict[str, ScoredMaps], rand: np.ndarray) -> dict[str, float]:
    """Teacher-student agreement on the scored images: labels, and each method's maps against
    the same score between the teacher's map and a random one."""
    teacher, student = scored["teacher"], scored["student"]
    out = {"agreement.predictions": prediction_agreement(teacher.predictions, student.predictions)}
    for method, t_maps in teacher.maps.items():
        s_maps = student.maps[method]
        out[f"agreement.rank_correlation.{method}"] = nanmean(rank_correlation(t_maps, s_maps))
        out[f"agreement.rank_correlation_random.{method}"] = nanmean(rank_correlation(t_maps, rand))
        out[f"agreement.top10_overlap.{method}"] = nanmean(
            top_overlap(t_maps, s_maps, TOP_FRACTION)
        )
        out[f"agreement.top10_overlap_random.{method}"] = nanmean(
            top_overlap(t_maps, rand, TOP_FRACTION)
        )
    return out


def _examples(labels: np.ndarray, masks: np.ndarray | None, k: int) -> list[int]:
    """Up to ``k`` positions, classes in turn, images with a lesion mask first within a class."""
    order: list[list[int]] = []
    for c in np.unique(labels):
        idx = list(np.flatnonzero(labels == c))
        if masks is not None:
            idx.sort(key=lambda i: not masks[i].any())
        order.append(idx)
    picked: list[int] = []
    while len(picked) < min(k, len(labels)):
        for pool in order:
            if pool and len(picked) < k:
                picked.append(int(pool.pop(0)))
    return picked


def build_report(
    data: PreparedData,
    teacher: nn.Module,
    student: nn.Module,
    cfg: ExplainConfig,
    out_dir: str | Path,
    *,
    seed: int = 0,
    steps: int = 12,
    baseline_probabilities: np.ndarray | None = None,
    learning_curves: Mapping[str, Sequence[float]] | None = None,
    train_images: tuple[int, int] | None = None,
    cams: Mapping[str, tuple[str, str]] | None = None,
    transparency: TransparencyConfig | None = None,
) -> Report:
    """Measure and write the transparency report of one dataset (see the module docstring).

    Args:
        data: the prepared dataset (test split scored, training split gives the background).
        teacher: the DenseNet121 teacher.
        student: the distilled student.
        cfg: ``methods``, layers, ``top_k_channels``, SHAP sizes, ``report_images``,
            ``timing_images`` and ``grid_examples``.
        out_dir: folder to write into (created).
        seed: seeds the image choice, SHAP sampling and random maps.
        steps: deletion / insertion curve steps.
        baseline_probabilities: the CE-only baseline's class probabilities on the whole test
            split, to show its calibration beside the two models'.
        learning_curves: ``teacher`` / ``student`` / ``baseline`` -> validation accuracy per
            epoch (their MLflow runs'), shown as a figure and a table; None or empty: no section.
        train_images: training images (teacher, students) when they differ from the training
            split's size for the students (``data.synthetic.student_fraction``); every
            comparison says what each side saw. Default: both the whole training split.
        cams: ``teacher`` / ``student`` -> (CAM variant, layer) measured for each model (its
            ``cam.json``); the config's layers override, the default layer stands in
            (:func:`kdray.explain.gradcam.resolve_cam`).
        transparency: the scoring recipe; with it the report compares every CAM variant
            (:mod:`kdray.explain.cam_report`).

    Returns:
        :class:`Report`.

    Raises:
        ValueError: an empty test split.
    """
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    test, train = data.splits["test"], data.splits["train"]
    if len(test) == 0:
        raise ValueError(f"{data.spec.id}: the test split is empty")
    classes = list(data.spec.classes)
    idx = stratified_indices(test.labels, cfg.report_images, seed)
    x = to_batch(test.images[idx])
    labels = test.labels[idx]
    masks = test.masks[idx] if test.masks is not None else None
    has_masks = masks is not None and bool(masks.any())
    if not has_masks:
        masks = None
    background = select_background(train.images, train.labels, cfg.shap_background, seed)
    size = data.image_size
    models = {"teacher": teacher, "student": student}
    resolved = {
        name: resolve_cam(name, model, cfg, size, (cams or {}).get(name))
        for name, model in models.items()
    }
    # The feature maps are scored at their own block, whichever layer the CAM reads.
    feature_layers = {name: cam_layer(name, model, cfg, size) for name, model in models.items()}
    rand = random_maps(len(idx), (size, size), seed)

    metrics: dict[str, float] = {}
    scored: dict[str, ScoredMaps] = {}
    curves: dict[str, dict[str, np.ndarray]] = {"deletion": {}, "insertion": {}}
    cam_shape: dict[str, tuple[str, tuple[int, int]]] = {}
    for name, model in models.items():
        scored[name] = _score_maps(
            model, resolved[name], x, background, cfg, seed, feature_layers[name]
        )
        metrics.update(
            measure_model(
                name,
                model,
                resolved[name],
                scored[name],
                x,
                labels,
                masks,
                background,
                rand,
                cfg,
                seed,
                steps,
                curves,
            )
        )
        layer = resolved[name].layer
        cam_shape[name] = (layer, layer_output_size(model, layer, size))
    metrics.update(_agreement(scored, rand))
    metrics.update(localise_test_split(models, test, cfg, seed, resolved, feature_layers))
    compared = None
    if transparency is not None and "gradcam" in cfg.methods:
        compared = compare_cams(models, data, resolved, cfg, transparency, seed)
        metrics.update(compared.metrics())
    sanity = None
    if cfg.sanity:
        sanity = run_sanity_checks(
            models,
            {
                name: (
                    resolved[name],
                    scored[name].layers[
                        feature_layer_index(scored[name].layers, feature_layers[name])
                    ],
                )
                for name in cam_shape
            },
            x,
            {name: scored[name].predictions for name in models},
            background,
            data.spec.num_classes,
            cfg,
            seed,
        )
        metrics.update(sanity.metrics())
    fractions = np.linspace(0.0, 1.0, steps + 1)
    for key in ("params", "flops", "flops_224", *(f"met_ms.{m}" for m in cfg.methods)):
        metrics[f"ratio.{key}"] = _ratio(metrics[f"teacher.{key}"], metrics[f"student.{key}"])
    metrics = {k: float(v) for k, v in metrics.items() if np.isfinite(v)}

    paths = {
        "markdown": out / "report.md",
        "json": out / "report.json",
        "grid": out / "explanations.png",
        "feature_maps": out / "feature_maps.png",
        "curves": out / "deletion_insertion.png",
    }
    shown = display_images(x)
    seen = train_images or (len(train), len(train))
    # The data's own name (a stand-in is never called by the public dataset's catalogue title).
    title = (
        f"{task_name(data)} · {data.source.label} ({data.spec.id}), {size}x{size}; trained on: "
        f"teacher {seen[0]}, students {seen[1]} images"
    )
    rows = []
    for i in _examples(labels, masks, cfg.grid_examples):
        rows.append(
            Example(
                image=shown[i],
                mask=masks[i] if masks is not None else None,
                label=classes[labels[i]],
                maps={n: {m: scored[n].maps[m][i] for m in cfg.methods} for n in MODELS},
                predictions={n: classes[scored[n].predictions[i]] for n in MODELS},
            )
        )
    explanation_grid(rows, paths["grid"], list(cfg.methods), title)
    first = _examples(labels, masks, 1)[0]
    feature_map_figure(
        shown[first],
        masks[first] if masks is not None else None,
        {n: (scored[n].layers, scored[n].all_feature_maps[first]) for n in MODELS},
        paths["feature_maps"],
        f"Feature maps, {classes[labels[first]]}: first block to last",
    )
    curves_figure(fractions, curves, paths["curves"], title)
    if sanity is not None:
        paths["sanity"] = sanity_figure(sanity, out / "sanity.png", f"Sanity checks, {title}")
    probabilities = {
        name: softmax(predict_logits(model, test.images))
        for name, model in (("teacher", teacher), ("student", student))
    }
    metrics["agreement.predictions_test"] = prediction_agreement(
        probabilities["teacher"].argmax(1), probabilities["student"].argmax(1)
    )
    calibrations = {name: calibration(p, test.labels) for name, p in probabilities.items()}
    if baseline_probabilities is not None and len(baseline_probabilities) == len(test):
        calibrations["baseline"] = calibration(baseline_probabilities, test.labels)
    for name, c in calibrations.items():
        metrics[f"{name}.ece"] = c["ece"]
    if "baseline" in calibrations:
        probabilities["baseline"] = baseline_probabilities
    for name, p in probabilities.items():  # the whole test split (the audit's figure too)
        metrics[f"{name}.accuracy_test"] = float((p.argmax(1) == test.labels).mean())
    paths["reliability"] = out / "reliability.png"
    reliability_figure(
        {CALIBRATION_LABELS[n]: c for n, c in calibrations.items()},
        paths["reliability"],
        f"Calibration, {data.spec.id} test split ({len(test)} images)",
    )
    curves = {
        k: [float(v) for v in vals] for k, vals in (learning_curves or {}).items() if len(vals)
    }
    if curves:
        paths["learning_curves"] = out / "learning_curves.png"
        learning_curves_figure(
            {CALIBRATION_LABELS.get(k, k): v for k, v in curves.items()},
            paths["learning_curves"],
            f"Learning curves, {data.spec.id} (teacher {seen[0]}, students {seen[1]} images)",
        )
    metrics["report_seconds"] = time.perf_counter() - started
    markdown = report_markdown(
        data,
        cfg,
        metrics,
        len(idx),
        masks,
        has_masks,
        paths,
        steps,
        cam_shape if "gradcam" in cfg.methods else {},
        curves,
        sanity,
        seen,
        resolved,
        compared,
    )
    paths["markdown"].write_text(markdown)
    paths["json"].write_text(json.dumps({"dataset": data.spec.id, "metrics": metrics}, indent=1))
    return Report(data.spec.id, markdown, paths, metrics)
