"""Report figures (matplotlib, headless): the explanation grid and the feature-map strips."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from kdray.explain.render import heat_overlay, signed_overlay  # noqa: E402

__all__ = [
    "Example",
    "curves_figure",
    "explanation_grid",
    "feature_map_figure",
    "learning_curves_figure",
    "reliability_figure",
]

MASK_COLOUR = "#39ff14"
MODEL_COLOURS = ("#1f4e9c", "#d9822b", "#3a9d5d", "#8e44ad")  # one per model, in order


@dataclass
class Example:
    """One row of the grid: an image, its mask and, per model, maps and the prediction.

    Attributes:
        image: float (H, W, 3) in [0, 1].
        mask: bool (H, W) or None.
        label: true class name.
        maps: ``{"teacher": {"feature_maps": m, "gradcam": m, "shap": m}, "student": {...}}``.
        predictions: ``{"teacher": name, "student": name}``.
    """

    image: np.ndarray
    mask: np.ndarray | None
    label: str
    maps: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    predictions: dict[str, str] = field(default_factory=dict)


def _panel(ax: Axes, rgb: np.ndarray, mask: np.ndarray | None, title: str | None = None) -> None:
    ax.imshow(rgb, interpolation="nearest")
    if mask is not None and mask.any():
        ax.contour(mask.astype(float), levels=[0.5], colors=MASK_COLOUR, linewidths=1.0)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


_METHOD_COLOURS = {
    "feature_maps": "tab:blue",
    "gradcam": "tab:orange",
    "shap": "tab:green",
    "random": "tab:gray",
}
_METHOD_TITLES = {"feature_maps": "feature map", "gradcam": "CAM", "shap": "SHAP"}


def _save(fig: Figure, path: Path, title: str) -> Path:
    """Title, lay out, write the PNG."""
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def explanation_grid(
    examples: list[Example], path: Path, methods: list[str], title: str = ""
) -> Path:
    """Input | teacher: feature map, Grad-CAM, SHAP | student: the same, one row per example.

    The lesion mask is outlined in green on every panel.

    Args:
        examples: the rows.
        path: PNG to write.
        methods: columns per model, from ``feature_maps``, ``gradcam``, ``shap``.
        title: figure title.
    """
    models = ["teacher", "student"]
    ncols = 1 + len(models) * len(methods)
    fig = Figure(figsize=(1.75 * ncols, 1.95 * len(examples) + 0.5))
    axes = fig.subplots(len(examples), ncols, squeeze=False)
    for r, ex in enumerate(examples):
        _panel(axes[r, 0], ex.image, ex.mask, "input" if r == 0 else None)
        axes[r, 0].set_ylabel(f"true: {ex.label}", fontsize=8)
        for m, model in enumerate(models):
            for k, method in enumerate(methods):
                ax = axes[r, 1 + m * len(methods) + k]
                a = ex.maps[model][method]
                rgb = signed_overlay(ex.image, a) if method == "shap" else heat_overlay(ex.image, a)
                _panel(ax, rgb, ex.mask, f"{model}\n{_METHOD_TITLES[method]}" if r == 0 else None)
                if k == 0:
                    ax.set_ylabel(f"pred: {ex.predictions[model]}", fontsize=8)
    return _save(fig, path, title)


def feature_map_figure(
    image: np.ndarray,
    mask: np.ndarray | None,
    rows: dict[str, tuple[list[str], np.ndarray]],
    path: Path,
    title: str = "",
) -> Path:
    """One row per model: the input, then its feature maps from the first block to the last.

    Args:
        image: float (H, W, 3) in [0, 1].
        mask: bool (H, W) or None (outlined on the input).
        rows: model name -> (layer names, maps (L, H, W) in [0, 1]).
        path: PNG to write.
    """
    ncols = 1 + max(len(layers) for layers, _ in rows.values())
    fig = Figure(figsize=(1.7 * ncols, 1.9 * len(rows) + 0.4))
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for r, (name, (layers, maps)) in enumerate(rows.items()):
        _panel(axes[r, 0], image, mask, "input")
        axes[r, 0].set_ylabel(name, fontsize=9)
        for c in range(1, ncols):
            ax = axes[r, c]
            if c - 1 < len(layers):
                _panel(ax, heat_overlay(image, maps[c - 1]), None, layers[c - 1].split(".")[-1])
            else:
                ax.axis("off")
    return _save(fig, path, title)


def curves_figure(
    fractions: np.ndarray, curves: dict[str, dict[str, np.ndarray]], path: Path, title: str = ""
) -> Path:
    """Mean deletion and insertion curves per model and method.

    Args:
        fractions: (S,) share of pixels replaced.
        curves: ``"deletion"``/``"insertion"`` -> ``"teacher gradcam"`` etc. -> (S,) mean curve;
            colour by method, solid for the teacher, dashed for the student.
        path: PNG to write.
    """
    fig = Figure(figsize=(9.5, 3.6))
    axes = fig.subplots(1, 2)
    for ax, kind in zip(axes, ("deletion", "insertion"), strict=True):
        for label, curve in curves[kind].items():
            model, _, method = label.partition(" ")
            ax.plot(
                fractions,
                curve,
                "--" if model == "student" else "-",
                label=label,
                color=_METHOD_COLOURS.get(method, "black"),
                linewidth=1.4,
            )
        ax.set_title(f"{kind} (mean class probability)", fontsize=10)
        ax.set_xlabel("share of pixels " + ("removed" if kind == "deletion" else "revealed"))
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right", ncol=2)
    return _save(fig, path, title)


def reliability_figure(calibrations: dict[str, dict], path: Path, title: str = "") -> Path:
    """Reliability diagram: accuracy against mean confidence per confidence bin, per model.

    Args:
        calibrations: label -> :func:`kdray.metrics.calibration` result (``ece``, bins).
        path: PNG to write.
    """
    fig = Figure(figsize=(4.6, 5.4))
    ax, hist = fig.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=1, label="perfectly calibrated")
    bins = len(next(iter(calibrations.values()))["bin_count"]) if calibrations else 1
    width = 1.0 / bins / (len(calibrations) + 1)
    for i, (label, c) in enumerate(calibrations.items()):
        conf, acc = np.asarray(c["bin_confidence"], float), np.asarray(c["bin_accuracy"], float)
        seen = np.isfinite(conf)
        colour = MODEL_COLOURS[i % len(MODEL_COLOURS)]
        count = np.asarray(c["bin_count"], float)
        # A bin of one or two images swings between 0 and 1: the line is faint and each point's
        # area follows its share of the images, so the eye goes to the bins that carry weight.
        ax.plot(conf[seen], acc[seen], "-", color=colour, linewidth=1.0, alpha=0.45)
        ax.scatter(
            conf[seen],
            acc[seen],
            s=8 + 400 * count[seen] / count.sum(),
            color=colour,
            alpha=0.85,
            edgecolors="white",
            linewidths=0.5,
            label=f"{label} (ECE {c['ece']:.3f})",
        )
        centres = (np.arange(bins) + 0.5) / bins
        hist.bar(
            centres + (i - (len(calibrations) - 1) / 2) * width,
            c["bin_count"],
            width=width,
            color=colour,
            alpha=0.8,
        )
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    legend = ax.legend(fontsize=7, loc="upper left")
    for handle in legend.legend_handles:
        if hasattr(handle, "set_sizes"):
            handle.set_sizes([30])
    hist.set_xlabel("confidence (top-class probability)")
    hist.set_ylabel("images")
    hist.grid(alpha=0.3)
    return _save(fig, path, title)


def learning_curves_figure(curves: dict[str, Sequence[float]], path: Path, title: str = "") -> Path:
    """Validation accuracy per epoch, one line per model, each model's best epoch marked.

    Args:
        curves: label -> validation accuracy of epochs 1, 2, ...
        path: PNG to write.
    """
    fig = Figure(figsize=(5.6, 3.6))
    ax = fig.subplots()
    for i, (label, values) in enumerate(curves.items()):
        y = np.asarray(values, float)
        if not len(y):
            continue
        x = np.arange(1, len(y) + 1)
        colour = MODEL_COLOURS[i % len(MODEL_COLOURS)]
        best = int(np.argmax(y))
        ax.plot(
            x,
            y,
            "-o",
            color=colour,
            markersize=2.5,
            linewidth=1.2,
            label=f"{label} (best {y[best]:.3f}, epoch {best + 1})",
        )
        ax.scatter(
            [x[best]], [y[best]], s=40, color=colour, edgecolors="black", linewidths=0.6, zorder=3
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path, title)
