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
from kdray.data.prepare import PreparedData, Split
from kdray.engine import predict_logits, softmax
from kdray.explain.agreement import (
    TOP_FRACTION,
    blank_maps,
    prediction_agreement,
    rank_correlation,
    top_overlap,
)
from kdray.explain.background import select_background, stratified_indices
from kdray.explain.cam_methods import CAM_TITLES
from kdray.explain.cam_report import CamComparison, compare_cams
from kdray.explain.cost import count_flops, count_params, time_call
from kdray.explain.expected_gradients import shap_maps
from kdray.explain.faithfulness import (
    deletion_insertion,
    energy_in_mask,
    nanmean,
    pointing_game,
    random_maps,
)
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
from kdray.explain.sanity_report import (
    SanityResults,
    run_sanity_checks,
    sanity_figure,
    sanity_section,
)
from kdray.metrics import calibration

__all__ = ["Report", "build_report", "feature_layer_index"]

MODELS = ("teacher", "student")
CALIBRATION_LABELS = {"teacher": "teacher", "student": "KD student", "baseline": "CE-only baseline"}
_TITLES = {
    "feature_maps": "Feature maps (deepest block of at least 7x7)",
    "gradcam": "Grad-CAM",
    "shap": "SHAP",
    "random": "Random map (baseline)",
}


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


@dataclass
class _Scored:
    """One model's maps on the scored images."""

    predictions: np.ndarray
    layers: list[str]
    all_feature_maps: np.ndarray  # (N, L, H, W)
    maps: dict[str, np.ndarray]  # method -> (N, H, W)
    seconds: float = 0.0


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
) -> _Scored:
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
    return _Scored(preds, fm.layers, fm.maps, maps, time.perf_counter() - t0)


LOCALISE_BATCH = 64  # images per Grad-CAM pass when scoring the whole test split


def _test_split_localisation(
    models: Mapping[str, nn.Module],
    test: Split,
    cfg: ExplainConfig,
    seed: int,
    cams: Mapping[str, Cam],
    feature_layers: Mapping[str, str],
) -> dict[str, float]:
    """Pointing game of the cheap maps on every test image with a lesion mask.

    The report's scored images hold 12 or so masks, so their pointing game moves in steps of
    1/12; the CAM, the feature maps at its block and a random map cost one forward (and
    backward) pass per image, so they are scored on the whole masked test split too (SHAP is
    not: it costs ``shap_nsamples`` passes per image). Empty without masks.
    """
    if test.masks is None:
        return {}
    keep = np.flatnonzero(test.masks.any(axis=(1, 2)))
    if len(keep) == 0:
        return {}
    masks = test.masks[keep]
    size = test.images.shape[-1]
    out = {
        "localisation_test.images": float(len(keep)),
        "localisation_test.random": nanmean(
            pointing_game(random_maps(len(keep), (size, size), seed), masks)
        ),
    }
    for name, model in models.items():
        method, layer = cams[name]
        maps: dict[str, list[np.ndarray]] = {"feature_maps": [], "gradcam": []}
        for start in range(0, len(keep), LOCALISE_BATCH):
            x = to_batch(test.images[keep[start : start + LOCALISE_BATCH]])
            fm = feature_maps(model, x, [feature_layers[name]], cfg.top_k_channels)
            maps["feature_maps"].append(fm.maps[:, 0])
            maps["gradcam"].append(grad_cam(model, x, layer, fm.logits.argmax(1), method).maps)
        for method, parts in maps.items():
            if method in cfg.methods:
                out[f"{name}.localisation_test.{method}"] = nanmean(
                    pointing_game(np.concatenate(parts), masks)
                )
        if "gradcam" in cfg.methods:
            out[f"{name}.blank_test.gradcam"] = float(
                blank_maps(np.concatenate(maps["gradcam"])).sum()
            )
    return out


def _met_ms(
    model: nn.Module,
    cam: Cam,
    x: torch.Tensor,
    preds: np.ndarray,
    background: np.ndarray,
    cfg: ExplainConfig,
    seed: int,
) -> dict[str, list[float]]:
    """Single-image times per method, in ms (after one untimed warm-up call each)."""
    n = min(cfg.timing_images, len(x))
    calls = {
        "feature_maps": lambda i: feature_maps(model, x[i : i + 1], None, cfg.top_k_channels),
        "gradcam": lambda i: grad_cam(model, x[i : i + 1], cam.layer, None, cam.method),
        "shap": lambda i: shap_maps(
            model, x[i : i + 1], background, preds[i : i + 1], cfg.shap_nsamples, seed=seed
        ),
    }
    out = {}
    for method in cfg.methods:
        call = calls[method]
        call(0)
        out[method] = [
            1e3 * time_call(lambda i=i, call=call: call(i), repeats=1, warmup=0)[0]
            for i in range(n)
        ]
    return out


def _cam_note(
    cam_shape: dict[str, tuple[str, tuple[int, int]]], cams: Mapping[str, Cam] | None = None
) -> list[str]:
    if not cam_shape:
        return []
    parts = [
        f"{name} {CAM_TITLES[cams[name].method] + ' ' if cams else ''}at `{layer}` ({h}x{w})"
        for name, (layer, (h, w)) in cam_shape.items()
    ]
    note = (
        f"Class activation maps: {', '.join(parts)}; each layer is the one the model's "
        "validation images chose (the best transparency score among its blocks that passes the "
        "randomisation check, docs/transparency.md) unless the config names one. The scored "
        "feature maps (the channel mean) are the deepest blocks of at least 7x7 "
        "(`explain.student_layer` / `teacher_layer` when set); `feature_maps.png` shows every "
        "block."
    )
    if min(min(hw) for _, hw in cam_shape.values()) < 4:
        note += (
            " A map this coarse, upsampled to the input, peaks in a corner of the image, so "
            "the pointing game and energy in mask cannot credit it; `explain.student_layer` "
            "/ `explain.teacher_layer` choose a finer layer (an earlier block)."
        )
    return [note, ""]


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _measure(
    name: str,
    model: nn.Module,
    cam: Cam,
    s: _Scored,
    x: torch.Tensor,
    labels: np.ndarray,
    masks: np.ndarray | None,
    background: np.ndarray,
    rand: np.ndarray,
    cfg: ExplainConfig,
    seed: int,
    steps: int,
    curves: dict[str, dict[str, np.ndarray]],
) -> dict[str, float]:
    """Cost, timing and faithfulness numbers of one model; mean curves go into ``curves``."""
    size = x.shape[-1]
    out: dict[str, float] = {
        f"{name}.params": count_params(model),
        f"{name}.flops": count_flops(model, size),
        f"{name}.flops_224": count_flops(model, 224),
        f"{name}.accuracy": float((s.predictions == labels).mean()),
        f"{name}.maps_seconds": s.seconds,  # all methods on all scored images, batched
    }
    for method, ms in _met_ms(model, cam, x, s.predictions, background, cfg, seed).items():
        out[f"{name}.met_ms.{method}"] = float(np.mean(ms))
        # other jobs on a shared machine stall single calls: the median shows that
        out[f"{name}.met_median_ms.{method}"] = float(np.median(ms))
    for method, maps in s.maps.items():
        out[f"{name}.blank.{method}"] = float(blank_maps(maps).sum())
    for method, maps in {**s.maps, "random": rand}.items():
        if masks is not None:
            out[f"{name}.pointing_game.{method}"] = nanmean(pointing_game(maps, masks))
            out[f"{name}.energy_in_mask.{method}"] = nanmean(energy_in_mask(maps, masks))
        di = deletion_insertion(model, x, maps, s.predictions, steps=steps, seed=seed)
        out[f"{name}.deletion_auc.{method}"] = float(di.deletion.mean())
        out[f"{name}.insertion_auc.{method}"] = float(di.insertion.mean())
        curves["deletion"][f"{name} {method}"] = di.deletion_curves.mean(0)
        curves["insertion"][f"{name} {method}"] = di.insertion_curves.mean(0)
    return out


def _agreement(scored: dict[str, _Scored], rand: np.ndarray) -> dict[str, float]:
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
    scored: dict[str, _Scored] = {}
    curves: dict[str, dict[str, np.ndarray]] = {"deletion": {}, "insertion": {}}
    cam_shape: dict[str, tuple[str, tuple[int, int]]] = {}
    for name, model in models.items():
        scored[name] = _score_maps(
            model, resolved[name], x, background, cfg, seed, feature_layers[name]
        )
        metrics.update(
            _measure(
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
    metrics.update(_test_split_localisation(models, test, cfg, seed, resolved, feature_layers))
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
        f"{_task(data)} · {data.source.label} ({data.spec.id}), {size}x{size}; trained on: "
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
    markdown = _markdown(
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


def _curves_section(curves: dict[str, list[float]], paths: dict[str, Path]) -> list[str]:
    if not curves:
        return []
    lines = [
        "",
        "## Learning curves (validation accuracy per epoch)",
        "",
        "Does the teacher know more than the student learns on its own? Validation accuracy per "
        "epoch from each model's MLflow run: the teacher's training, the KD champion's and the "
        "CE-only baseline's sweep trials (their seeds retrain the same recipes).",
        "",
        "| Model | Epochs | Best (epoch) | Last epoch |",
        "|---|---:|---:|---:|",
    ]
    for name, values in curves.items():
        best = int(np.argmax(values))
        lines.append(
            f"| {CALIBRATION_LABELS.get(name, name)} | {len(values)} | "
            f"{values[best]:.3f} ({best + 1}) | {values[-1]:.3f} |"
        )
    return [*lines, "", f"![Learning curves]({paths['learning_curves'].name})"]


def _markdown(
    data: PreparedData,
    cfg: ExplainConfig,
    m: dict[str, float],
    n: int,
    masks: np.ndarray | None,
    has_masks: bool,
    paths: dict[str, Path],
    steps: int,
    cam_shape: dict[str, tuple[str, tuple[int, int]]],
    curves: dict[str, list[float]],
    sanity: SanityResults | None = None,
    seen: tuple[int, int] | None = None,
    cams: Mapping[str, Cam] | None = None,
    compared: CamComparison | None = None,
) -> str:
    size = data.image_size
    get = lambda key: m.get(key, float("nan"))  # noqa: E731
    # The CAM rows carry the models' variant (HiResCAM, Grad-CAM, ...).
    variants = {CAM_TITLES[c.method] for c in (cams or {}).values()}
    cam_title = variants.pop() if len(variants) == 1 else "CAM (teacher / student variant)"
    TITLES = {**_TITLES, "gradcam": cam_title}  # noqa: N806
    n_masked = int(masks.any(axis=(1, 2)).sum()) if masks is not None else 0
    synthetic = data.source.synthetic
    lines = [
        f"# Transparency report: {_task(data)} (`{data.spec.id}`), {data.source.describe()}",
        "",
        "Trained on: "
        + (
            f"kdray's {data.source.describe()}, not the public {data.spec.title}: figures "
            "here describe models of the stand-in."
            if synthetic
            else f"the images of {data.source.describe()}."
        ),
        "",
        f"Input {size}x{size}. {n} test images scored ({n_masked} with a lesion mask); mean "
        f"execution time (MET) over {min(cfg.timing_images, n)} single-image calls, "
        f"{torch.get_num_threads()} torch thread(s). SHAP: expected gradients, "
        f"{cfg.shap_nsamples} samples, {cfg.shap_background} background images. Maps explain "
        f"each model's own prediction. Built in {get('report_seconds'):.0f} s.",
        "",
        *_cam_note(cam_shape, cams),
        "## Cost",
        "",
        "| | Teacher | Student | Teacher / student |",
        "|---|---:|---:|---:|",
    ]
    for label, key in (
        ("Parameters", "params"),
        (f"FLOPs @ {size}x{size}", "flops"),
        ("FLOPs @ 224x224", "flops_224"),
    ):
        t, s = get(f"teacher.{key}"), get(f"student.{key}")
        lines.append(f"| {label} | {_human(t)} | {_human(s)} | {_fmt(get(f'ratio.{key}'), 1)}x |")
    lines.append(
        f"| Accuracy (scored images) | {_fmt(get('teacher.accuracy'), 2)} | "
        f"{_fmt(get('student.accuracy'), 2)} | |"
    )
    for method in cfg.methods:
        key = f"met_ms.{method}"
        med = f"met_median_ms.{method}"
        lines.append(
            f"| MET {TITLES[method].split(' (')[0]} (ms), mean (median) | "
            f"{_fmt(get(f'teacher.{key}'), 1)} ({_fmt(get(f'teacher.{med}'), 1)}) | "
            f"{_fmt(get(f'student.{key}'), 1)} ({_fmt(get(f'student.{med}'), 1)}) | "
            f"{_fmt(get(f'ratio.{key}'), 1)}x |"
        )
    methods = [*cfg.methods, "random"]
    lines += ["", "## Localisation on the lesion masks (higher is better)", ""]
    if has_masks:
        lines += [
            "Pointing game: share of images whose map peaks inside the mask. Energy in mask: "
            "share of the map's positive mass inside the mask. Images of healthy classes (empty "
            "mask) are left out.",
            "",
            "| Method | Pointing game, teacher | Pointing game, student | Energy in mask, teacher "
            "| Energy in mask, student |",
            "|---|---:|---:|---:|---:|",
        ]
        for method in methods:
            lines.append(
                f"| {TITLES[method]} | {_fmt(get(f'teacher.pointing_game.{method}'), 2)} | "
                f"{_fmt(get(f'student.pointing_game.{method}'), 2)} | "
                f"{_fmt(get(f'teacher.energy_in_mask.{method}'), 2)} | "
                f"{_fmt(get(f'student.energy_in_mask.{method}'), 2)} |"
            )
        if "localisation_test.images" in m:
            n_test = int(m["localisation_test.images"])
            lines += [
                "",
                f"The same pointing game on every test image with a lesion mask ({n_test}), for the "
                "maps that cost one pass per image (SHAP is scored on the images above only):",
                "",
                "| Method | Pointing game, teacher | Pointing game, student |",
                "|---|---:|---:|",
            ]
            for method in ("feature_maps", "gradcam"):
                if method in cfg.methods:
                    lines.append(
                        f"| {TITLES[method]} | "
                        f"{_fmt(get(f'teacher.localisation_test.{method}'), 2)} | "
                        f"{_fmt(get(f'student.localisation_test.{method}'), 2)} |"
                    )
            random = _fmt(get("localisation_test.random"), 2)
            lines.append(f"| {TITLES['random']} | {random} | {random} |")
    else:
        lines.append("No lesion masks for this dataset: localisation not scored.")
    lines += [
        "",
        "## Deletion / insertion",
        "",
        f"Area under the class-probability curve as the most attributed pixels are replaced by a "
        f"blurred copy (deletion, lower is better) or revealed over it (insertion, higher is "
        f"better); {steps} steps.",
        "",
        "| Method | Deletion, teacher | Deletion, student | Insertion, teacher | Insertion, student |",
        "|---|---:|---:|---:|---:|",
    ]
    for method in methods:
        lines.append(
            f"| {TITLES[method]} | {_fmt(get(f'teacher.deletion_auc.{method}'))} | "
            f"{_fmt(get(f'student.deletion_auc.{method}'))} | "
            f"{_fmt(get(f'teacher.insertion_auc.{method}'))} | "
            f"{_fmt(get(f'student.insertion_auc.{method}'))} |"
        )
    lines += [
        "",
        "## Teacher–student agreement",
        "",
        "Does the student stand in for the teacher? Labels: share of images where the student "
        f"predicts the teacher's class ({_fmt(get('agreement.predictions'), 2)} on the {n} scored "
        f"images, {_fmt(get('agreement.predictions_test'), 2)} on the whole test split). Maps: "
        "per image, Spearman rank correlation of the teacher's and the student's map over the "
        f"pixels, and intersection over union of their top {TOP_FRACTION:.0%} pixels; each beside "
        "the same score of the teacher's map against a random map of the same smoothness (what "
        "agreement by chance looks like). Each map explains its own model's prediction.",
        "",
        "| Method | Rank correlation | random map | Top-10 % overlap (IoU) | random map |",
        "|---|---:|---:|---:|---:|",
    ]
    for method in cfg.methods:
        lines.append(
            f"| {TITLES[method]} | {_fmt(get(f'agreement.rank_correlation.{method}'), 2)} | "
            f"{_fmt(get(f'agreement.rank_correlation_random.{method}'), 2)} | "
            f"{_fmt(get(f'agreement.top10_overlap.{method}'), 2)} | "
            f"{_fmt(get(f'agreement.top10_overlap_random.{method}'), 2)} |"
        )
    if compared is not None:
        lines += compared.section()
    if sanity is not None:
        lines += sanity_section(sanity, paths["sanity"].name, m)
    lines += _curves_section(curves, paths)
    lines += [
        "",
        "## Calibration (whole test split)",
        "",
        "Accuracy, and expected calibration error of the top class (15 equal-width confidence "
        "bins; 0 is perfect, lower is better): the gap between how sure a model is and how "
        "often it is right.",
        "",
        "| Model | Accuracy | ECE |",
        "|---|---:|---:|",
        *(
            f"| {CALIBRATION_LABELS[n]} | {_fmt(get(f'{n}.accuracy_test'))} | {_fmt(get(f'{n}.ece'))} |"
            for n in ("teacher", "student", "baseline")
            if f"{n}.ece" in m
        ),
        "",
        f"![Reliability diagram]({paths['reliability'].name})",
    ]
    lines += [
        "",
        "## Figures",
        "",
        f"![Example explanations]({paths['grid'].name})",
        "",
        f"![Feature maps]({paths['feature_maps'].name})",
        "",
        f"![Deletion and insertion curves]({paths['curves'].name})",
        "",
    ]
    return "\n".join(_disclose(lines, seen, synthetic))


def _task(data: PreparedData) -> str:
    """The task's name without the public dataset's size and source: ``Brain Tumor MRI``."""
    return data.spec.title.split(" (")[0]


def _disclose(lines: list[str], seen: tuple[int, int] | None, synthetic: bool) -> list[str]:
    """Every section compares teacher and student: each states the training images each saw."""
    if seen is None:
        return lines
    teacher, students = seen
    note = f"_Trained on: teacher {teacher} images, students (KD and CE-only) {students}"
    if teacher > students:
        note += (
            " (on the synthetic stand-in the students see `data.synthetic.student_fraction` of "
            "the training split: the teacher's extra images stand in for its ImageNet "
            "pretraining, and part of any teacher-student margin is that extra data)"
            if synthetic
            else ""
        )
    note += "._"
    out: list[str] = []
    for line in lines:
        out.append(line)
        if line.startswith("## "):
            out += ["", note]
    return out
