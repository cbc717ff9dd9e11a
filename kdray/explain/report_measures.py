"""The per-model numbers of the transparency report: cost, timing, faithfulness, localisation.

:func:`measure_model` gives one model's parameters, FLOPs, single-image execution time per
method and, on the scored images, blank maps, pointing game, energy in mask and deletion /
insertion AUC; :func:`localise_test_split` scores the cheap maps on every masked test image.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from kdray.config import ExplainConfig
from kdray.data.prepare import Split
from kdray.explain.agreement import blank_maps
from kdray.explain.cost import count_flops, count_params, time_call
from kdray.explain.expected_gradients import shap_maps
from kdray.explain.faithfulness import (
    deletion_insertion,
    energy_in_mask,
    nanmean,
    pointing_game,
    random_maps,
)
from kdray.explain.gradcam import Cam, grad_cam
from kdray.explain.inputs import to_batch
from kdray.explain.layer_maps import feature_maps

__all__ = ["LOCALISE_BATCH", "ScoredMaps", "localise_test_split", "measure_model"]


@dataclass
class ScoredMaps:
    """One model's maps on the scored images."""

    predictions: np.ndarray
    layers: list[str]
    all_feature_maps: np.ndarray  # (N, L, H, W)
    maps: dict[str, np.ndarray]  # method -> (N, H, W)
    seconds: float = 0.0


LOCALISE_BATCH = 64  # images per Grad-CAM pass when scoring the whole test split


def localise_test_split(
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


def measure_model(
    name: str,
    model: nn.Module,
    cam: Cam,
    s: ScoredMaps,
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
