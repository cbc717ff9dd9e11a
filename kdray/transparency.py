"""The transparency step of a run: explain teacher and champion, log the report to MLflow."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from kdray.champion import baseline_probabilities_path
from kdray.config import ExperimentConfig
from kdray.data.prepare import PreparedData
from kdray.explain.report import Report, build_report
from kdray.explain.scoring import cam_choice, load_cam_choice, scoring_set
from kdray.models import load_model
from kdray.tracking import Tracker
from kdray.workspace import Workspace

__all__ = ["learning_curves", "report_dataset"]

log = logging.getLogger("kdray")


def _val_accuracy(tracker: Tracker, run_id: str | None) -> list[float]:
    """A run's ``val_accuracy`` per epoch (step), the last point of each step."""
    if not run_id:
        return []
    by_step = {
        m.step: m.value
        for m in sorted(
            tracker.client.get_metric_history(run_id, "val_accuracy"),
            key=lambda m: (m.step, m.timestamp),
        )
    }
    return [by_step[k] for k in sorted(by_step)]


def learning_curves(tracker: Tracker, parent_run_id: str) -> dict[str, list[float]]:
    """Validation accuracy per epoch of a dataset's teacher, KD champion and CE-only baseline.

    Found through the parent run's tags (``kdray.teacher_run``, ``kdray.champion_run``,
    ``kdray.baseline_run``); the champion's and the baseline's curves are those of the sweep
    trials they were chosen from (``kdray.source_trial_run``). A run that is not there gives no
    curve.
    """
    tags = tracker.client.get_run(parent_run_id).data.tags

    def source_trial(run_id: str | None) -> str | None:
        if not run_id:
            return None
        return tracker.client.get_run(run_id).data.tags.get("kdray.source_trial_run")

    runs = {
        "teacher": tags.get("kdray.teacher_run"),
        "student": source_trial(tags.get("kdray.champion_run")),
        "baseline": source_trial(tags.get("kdray.baseline_run")),
    }
    curves = {name: _val_accuracy(tracker, run_id) for name, run_id in runs.items()}
    return {name: values for name, values in curves.items() if values}


def report_dataset(
    cfg: ExperimentConfig,
    data: PreparedData,
    teacher_dir: Path,
    champion_dir: Path,
    ws: Workspace,
    tracker: Tracker,
    parent_run_id: str,
    champion_run_id: str | None = None,
) -> Report:
    """Write ``<workspace>/reports/<dataset>/`` and log it to the dataset's parent run.

    The report's numbers go to the parent run as ``explain.<model>.<metric>`` metrics, its
    files under the ``transparency/`` artifact folder; the champion run gets its feature-map
    figure.
    """
    teacher, _ = load_model(teacher_dir)
    student, _ = load_model(champion_dir)
    # Each model's CAM variant and layer, measured when it was trained (cam.json); a teacher
    # trained before kdray measured them is measured now (and the choice saved beside it).
    scoring = scoring_set(cfg, data)
    cams = {
        role: (choice.method, choice.layer)
        for role, model, folder in (
            ("teacher", teacher, teacher_dir),
            ("student", student, champion_dir),
        )
        if (choice := load_cam_choice(folder) or cam_choice(cfg, model, folder, scoring))
    }
    out = ws.reports / data.spec.id
    baseline = baseline_probabilities_path(ws, data.spec.id)
    report = build_report(
        data,
        teacher,
        student,
        cfg.explain,
        out,
        seed=cfg.seed,
        baseline_probabilities=np.load(baseline) if baseline.is_file() else None,
        learning_curves=learning_curves(tracker, parent_run_id),
        train_images=(
            len(data.splits["train"]),
            len(data.student_indices(cfg.data.student_fraction(data.spec.id), cfg.data.split_seed)),
        ),
        cams=cams,
        transparency=cfg.transparency,
    )
    # kdray.pareto_report and kdray.search_findings, written after the sweep
    for section in ("pareto.md", "search.md"):
        if (out / section).is_file():
            markdown = report.paths["markdown"]
            text = (out / section).read_text()
            markdown.write_text(markdown.read_text().rstrip("\n") + "\n\n" + text)
    tracker.log_metrics(parent_run_id, {f"explain.{k}": v for k, v in report.metrics.items()})
    tracker.log_artifacts(parent_run_id, str(out), "transparency")
    if champion_run_id is not None:
        tracker.client.log_artifact(champion_run_id, str(report.paths["feature_maps"]))
    log.info("%s: transparency report in %s", data.spec.id, report.paths["markdown"])
    return report
