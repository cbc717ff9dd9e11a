"""The text of the transparency report (``report.md``): its sections, tables and notes.

:func:`report_markdown` writes the markdown from the flat metrics that
:func:`kdray.explain.report.build_report` measured; every section that compares teacher and
student states the training images each saw.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from kdray.config import ExplainConfig
from kdray.data.prepare import PreparedData
from kdray.explain.agreement import TOP_FRACTION
from kdray.explain.cam_methods import CAM_TITLES
from kdray.explain.cam_report import CamComparison
from kdray.explain.gradcam import Cam
from kdray.explain.sanity_report import SanityResults, sanity_section

__all__ = ["CALIBRATION_LABELS", "report_markdown", "task_name"]

CALIBRATION_LABELS = {"teacher": "teacher", "student": "KD student", "baseline": "CE-only baseline"}
_TITLES = {
    "feature_maps": "Feature maps (deepest block of at least 7x7)",
    "gradcam": "Grad-CAM",
    "shap": "SHAP",
    "random": "Random map (baseline)",
}


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


def report_markdown(
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
        f"# Transparency report: {task_name(data)} (`{data.spec.id}`), {data.source.describe()}",
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


def task_name(data: PreparedData) -> str:
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
