"""Explanations of kdray models: feature maps, Grad-CAM, SHAP, faithfulness scores and the report.

Everything takes float images in [0, 1] (or uint8), runs the model in eval mode under a per-model
lock and leaves it as it was found (no hooks, flags or modes changed), so several threads can
explain one model at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Where each public name lives. The package imports them on first use (PEP 562): a Ray worker
# that only needs ``kdray.explain.background`` (the teacher's driver, through kdray.teacher)
# does not pay for pytorch-grad-cam, scikit-learn and matplotlib at start-up.
_SOURCES = {
    "api": ("METHODS", "Explainer", "Explanation", "LayerMap", "MethodResult", "explain"),
    "background": ("load_background", "save_background", "select_background"),
    "cost": ("count_flops",),
    "expected_gradients": ("ShapMaps", "shap_maps"),
    "faithfulness": ("deletion_insertion", "energy_in_mask", "pointing_game", "random_maps"),
    "gradcam": ("CamMaps", "ExplainError", "grad_cam"),
    "hooks": ("model_lock",),
    "layer_maps": ("FeatureMaps", "feature_maps"),
    "report": ("Report", "build_report"),
}
_MODULE_OF = {name: module for module, names in _SOURCES.items() for name in names}

if TYPE_CHECKING:
    from kdray.explain.api import METHODS, Explainer, Explanation, LayerMap, MethodResult, explain
    from kdray.explain.background import load_background, save_background, select_background
    from kdray.explain.cost import count_flops
    from kdray.explain.expected_gradients import ShapMaps, shap_maps
    from kdray.explain.faithfulness import (
        deletion_insertion,
        energy_in_mask,
        pointing_game,
        random_maps,
    )
    from kdray.explain.gradcam import CamMaps, ExplainError, grad_cam
    from kdray.explain.hooks import model_lock
    from kdray.explain.layer_maps import FeatureMaps, feature_maps
    from kdray.explain.report import Report, build_report


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value
    return value


__all__ = [
    "METHODS",
    "CamMaps",
    "ExplainError",
    "Explainer",
    "Explanation",
    "FeatureMaps",
    "LayerMap",
    "MethodResult",
    "Report",
    "ShapMaps",
    "build_report",
    "count_flops",
    "deletion_insertion",
    "energy_in_mask",
    "explain",
    "feature_maps",
    "grad_cam",
    "load_background",
    "model_lock",
    "pointing_game",
    "random_maps",
    "save_background",
    "select_background",
    "shap_maps",
]
