"""Score a finished model on a split and write the result to its MLflow run."""

from __future__ import annotations

from typing import Any

from torch import nn

from kdray.data.prepare import Split
from kdray.engine import evaluate
from kdray.tracking import Tracker

__all__ = ["SCALAR_METRICS", "evaluate_and_log"]

SCALAR_METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "loss", "ece")


def evaluate_and_log(
    model: nn.Module,
    split: Split,
    class_names: list[str],
    tracker: Tracker,
    run_id: str,
    prefix: str = "test",
    title: str = "",
) -> dict[str, Any]:
    """Evaluate, then log ``<prefix>_accuracy`` etc., the per-class report and the confusion image."""
    metrics, _ = evaluate(model, split, class_names)
    tracker.log_metrics(run_id, {f"{prefix}_{k}": metrics[k] for k in SCALAR_METRICS})
    tracker.client.log_dict(
        run_id,
        {
            "per_class": metrics["per_class"],
            "confusion": metrics["confusion"],
            "class_names": class_names,
        },
        f"{prefix}_report.json",
    )
    from kdray.figures import confusion_figure  # matplotlib: only where a figure is drawn

    fig = confusion_figure(metrics["confusion"], class_names, title or f"{prefix} confusion matrix")
    tracker.log_figure(run_id, fig, f"{prefix}_confusion.png")
    return metrics
