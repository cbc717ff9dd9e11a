"""The transparency report's sanity checks (:mod:`kdray.explain.sanity`) on teacher and student:
the maps the report scores, their metrics, a figure and the report's section."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

from kdray.config import ExplainConfig
from kdray.explain.cam_methods import CAM_TITLES
from kdray.explain.expected_gradients import shap_maps
from kdray.explain.gradcam import Cam, grad_cam
from kdray.explain.layer_maps import feature_maps
from kdray.explain.sanity import PASS_BELOW, Cascade, MapFn, parameter_randomisation, random_logit

__all__ = ["SanityResults", "run_sanity_checks", "sanity_figure", "sanity_section"]

TITLES = {"feature_maps": "Feature maps", "gradcam": "Grad-CAM", "shap": "SHAP"}
CLASS_SENSITIVE = ("gradcam", "shap")  # feature maps: one map per image, whatever the class


@dataclass
class SanityResults:
    cascades: list[Cascade] = field(default_factory=list)
    random_logit: dict[str, tuple[float, float]] = field(default_factory=dict)  # model.method
    seconds: dict[str, float] = field(default_factory=dict)  # per model
    cam_titles: dict[str, str] = field(default_factory=dict)  # model -> its CAM variant's title

    def title(self, model: str, method: str) -> str:
        """A method's label: the model's CAM variant (HiResCAM, Grad-CAM, ...) for the CAM."""
        return self.cam_titles.get(model, TITLES[method]) if method == "gradcam" else TITLES[method]

    def metrics(self) -> dict[str, float]:
        """``<model>.randomisation.<method>`` (rank correlation with the fully randomised
        model), ``<model>.randomisation_ssim.<method>``, ``<model>.randomisation_pass.<method>``
        (1 or 0), ``<model>.random_logit.<method>`` and ``<model>.sanity_seconds``."""
        out: dict[str, float] = {}
        for c in self.cascades:
            out[f"{c.model}.randomisation.{c.method}"] = c.final
            out[f"{c.model}.randomisation_ssim.{c.method}"] = c.ssim[-1]
            out[f"{c.model}.randomisation_pass.{c.method}"] = float(c.passed)
        for key, (rho, _) in self.random_logit.items():
            model, method = key.split(".")
            out[f"{model}.random_logit.{method}"] = rho
        for model, seconds in self.seconds.items():
            out[f"{model}.sanity_seconds"] = seconds
        return out


def _map_fns(
    cam: Cam, feature_layer: str, background: np.ndarray, cfg: ExplainConfig, seed: int
) -> dict[str, MapFn]:
    """The report's maps as functions of (model, images, targets)."""
    return {
        "feature_maps": lambda m, x, t: feature_maps(
            m, x, [feature_layer], cfg.top_k_channels
        ).maps[:, 0],
        "gradcam": lambda m, x, t: grad_cam(m, x, cam.layer, t, cam.method).maps,
        "shap": lambda m, x, t: shap_maps(m, x, background, t, cfg.shap_nsamples, seed=seed).maps,
    }


def run_sanity_checks(
    models: Mapping[str, nn.Module],
    layers: Mapping[str, tuple[Cam, str]],
    x: torch.Tensor,
    predictions: Mapping[str, np.ndarray],
    background: np.ndarray,
    num_classes: int,
    cfg: ExplainConfig,
    seed: int = 0,
) -> SanityResults:
    """Both checks for every method of ``cfg.methods`` on each model.

    Args:
        layers: model -> (its CAM: variant and layer, the feature-map layer the report scores).
        x: the report's scored images; the first ``cfg.sanity_images`` are explained
            (``cfg.sanity_shap_images`` for SHAP).
        predictions: model -> its predicted class per image of ``x`` (what every map explains).
    """
    results = SanityResults(
        cam_titles={name: CAM_TITLES[cam.method] for name, (cam, _) in layers.items()}
    )
    n = min(cfg.sanity_images, len(x))
    images = x[:n]
    for name, model in models.items():
        started = time.perf_counter()
        fns = _map_fns(*layers[name], background, cfg, seed)
        counts = {m: min(cfg.sanity_shap_images if m == "shap" else n, n) for m in cfg.methods}
        preds = np.asarray(predictions[name])[:n]
        results.cascades += parameter_randomisation(
            model, name, images, {m: (fns[m], counts[m]) for m in cfg.methods}, preds, seed
        )
        for method in cfg.methods:
            if method in CLASS_SENSITIVE:
                k = counts[method]
                results.random_logit[f"{name}.{method}"] = random_logit(
                    model, images[:k], fns[method], preds[:k], num_classes, seed
                )
        results.seconds[name] = time.perf_counter() - started
    return results


def sanity_figure(results: SanityResults, path: Path, title: str) -> Path:
    """Rank correlation with the trained model's maps along the cascade, one panel per model."""
    models = list(dict.fromkeys(c.model for c in results.cascades))
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for c in (c for c in results.cascades if c.model == model):
            ax.plot(
                range(len(c.steps)),
                c.rank_correlation,
                marker="o",
                label=results.title(c.model, c.method),
            )
            ax.set_xticks(range(len(c.steps)), c.steps, rotation=30, ha="right", fontsize=8)
        ax.axhline(PASS_BELOW, color="grey", linestyle="--", linewidth=1)
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"{model}: randomised from the output down", fontsize=10)
        ax.set_ylabel("|rank correlation| with trained maps")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(value: float) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.2f}"


def sanity_section(results: SanityResults, figure: str, metrics: Mapping[str, float]) -> list[str]:
    """The report's "Sanity checks" section.

    Args:
        metrics: the report's, for its blank-map counts: ``<model>.blank.<method>`` on the
            scored images, ``<model>.blank_test.gradcam`` on the whole masked test split
            (``localisation_test.images`` images).
    """
    n = max((c.images for c in results.cascades if c.method != "shap"), default=0)
    lines = [
        "",
        "## Sanity checks (Adebayo et al. 2018)",
        "",
        "Does a map depend on what the network learned? Each model's parameters are "
        "re-initialised cumulatively from the output down (the classifier, then the last block, "
        "..., the first) and each step's maps are compared with the trained model's, for the "
        f"class the trained model predicted, on {n} scored images (SHAP on "
        f"{min((c.images for c in results.cascades if c.method == 'shap'), default=0)}). A "
        f"method passes when its maps' mean absolute Spearman rank correlation with the fully "
        f"randomised model's is below {PASS_BELOW} (absolute: a map turned into its negative "
        "still shows the same structure): a map that survives randomising the whole network "
        "shows the image, not the model (an edge detector would fail). Random logit: the map of the "
        "predicted class against the map of a random other class (low is class-sensitive). The "
        "feature maps are class-blind by design (one channel-mean map per image, whatever the "
        "class): the random-logit test does not apply to them, and since they read one block, "
        "randomising the blocks above it leaves them unchanged: their curve falls once their "
        "own block is reached. A constant (blank) map counts as no similarity.",
        "",
        "| Model | Method | abs. rank corr., fully randomised | SSIM | Verdict | Random logit |",
        "|---|---|---:|---:|---|---:|",
    ]
    for c in results.cascades:
        rl = results.random_logit.get(f"{c.model}.{c.method}")
        lines.append(
            f"| {c.model} | {results.title(c.model, c.method)} | {_fmt(c.final)} | "
            f"{_fmt(c.ssim[-1])} | "
            f"{'passes' if c.passed else '**fails**'} | "
            f"{_fmt(rl[0]) if rl else 'n/a (class-blind)'} |"
        )
    seconds = ", ".join(f"{m} {s:.1f} s" for m, s in results.seconds.items())
    lines += ["", f"Time: {seconds}.", "", f"![Sanity checks]({figure})", ""]
    models = ("teacher", "student")
    counted = [
        f"{model} {results.title(model, method)} {int(metrics[key])}"
        for model in models
        for method in CLASS_SENSITIVE
        if (key := f"{model}.blank.{method}") in metrics
    ]
    if counted:
        lines.append(
            "Blank maps (zero everywhere: a class activation map is the ReLU of a sum over the "
            "layer's channels, and where negative evidence outweighs positive everywhere nothing "
            "is left; Grad-CAM averages each channel's gradient over the map first, which makes "
            "that most likely) among the scored images: " + ", ".join(counted) + "."
        )
    if "localisation_test.images" in metrics:
        lines.append(
            f"On the whole masked test split ({int(metrics['localisation_test.images'])} images), "
            "blank CAM maps: "
            + ", ".join(
                f"{model} {int(metrics[key])}"
                for model in models
                if (key := f"{model}.blank_test.gradcam") in metrics
            )
            + ". The localisation scores count a blank map as a miss; the viewer says "
            '"no positive evidence for this class at this layer" instead of drawing it.'
        )
    return lines
