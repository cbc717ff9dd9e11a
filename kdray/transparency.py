"""The transparency step of a run: explain teacher and champion, log the report to MLflow."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from kdray.champion import baseline_probabilities_path
from kdray.config import ExperimentConfig
from kdray.data.prepare import PreparedData
from kdray.explain.report import Report, build_report
from kdray.models import load_model
from kdray.tracking import Tracker
from kdray.workspace import Workspace

__all__ = ["report_dataset"]

log = logging.getLogger("kdray")


def report_dataset(
    cfg: ExperimentConfig, data: PreparedData, teacher_dir: Path, champion_dir: Path, ws: Workspace,
    tracker: Tracker, parent_run_id: str, champion_run_id: str | None = None,
) -> Report:
    """Write ``<workspace>/reports/<dataset>/`` and log it to the dataset's parent run.

    The report's numbers go to the parent run as ``explain.<model>.<metric>`` metrics, its
    files under the ``transparency/`` artifact folder; the champion run gets its feature-map
    figure.
    """
    teacher, _ = load_model(teacher_dir)
    student, _ = load_model(champion_dir)
    out = ws.reports / data.spec.id
    baseline = baseline_probabilities_path(ws, data.spec.id)
    report = build_report(data, teacher, student, cfg.explain, out, seed=cfg.seed,
                          baseline_probabilities=np.load(baseline) if baseline.is_file() else None)
    tracker.log_metrics(parent_run_id, {f"explain.{k}": v for k, v in report.metrics.items()})
    tracker.log_artifacts(parent_run_id, str(out), "transparency")
    if champion_run_id is not None:
        tracker.client.log_artifact(champion_run_id, str(report.paths["feature_maps"]))
    log.info("%s: transparency report in %s", data.spec.id, report.paths["markdown"])
    return report
