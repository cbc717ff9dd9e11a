"""The main job: for each dataset, data -> teacher (Ray Train) -> KD sweep (Ray Tune) -> champion."""

from __future__ import annotations

import csv
import io
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import ray

from kdray.config import ExperimentConfig, RayConfig
from kdray.data.prepare import prepare_dataset
from kdray.sweep import run_sweep
from kdray.teacher import train_teacher
from kdray.tracking import Tracker
from kdray.workspace import Workspace

__all__ = ["DatasetSummary", "format_summary", "ray_session", "run_pipeline"]

log = logging.getLogger("kdray")


@dataclass
class DatasetSummary:
    dataset: str
    teacher_test_accuracy: float
    teacher_test_f1: float
    student_test_accuracy: float
    student_test_f1: float
    alpha: float
    temperature: float
    widths: str
    teacher_params: int
    student_params: int
    param_ratio: float
    teacher_reused: bool
    trials: int
    seconds: float


@contextmanager
def ray_session(cfg: RayConfig, ws: Workspace) -> Iterator[None]:
    """Join ``ray.address`` / ``$RAY_ADDRESS``, else start a private local Ray; shut down what we started."""
    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # address="local" never attaches to another Ray that happens to run on this machine.
        ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False,
                 _temp_dir=cfg.temp_dir or f"/tmp/kdray-ray-{os.getuid()}")
    try:
        yield
    finally:
        ray.shutdown()


def run_dataset(cfg: ExperimentConfig, dataset: str, ws: Workspace, tracker: Tracker) -> DatasetSummary:
    started = time.perf_counter()
    data = prepare_dataset(cfg.data, dataset, ws)
    log.info("%s: %s images (train/val/test)", dataset, data.manifest.counts())
    parent = tracker.start_run(dataset, dataset, "parent",
                               tags={"kdray.manifest": data.manifest.fingerprint[:12]})
    try:
        tracker.log_config(parent, cfg.to_dict())
        tracker.log_params(parent, {f"n_{k}": v for k, v in data.manifest.counts().items()})
        teacher = train_teacher(cfg, data, ws, tracker, parent)
        log.info("%s: teacher %s, test accuracy %.3f", dataset,
                 "reused" if teacher.reused else "trained", teacher.test_metrics["accuracy"])
        champion = run_sweep(cfg, data, teacher, ws, tracker, parent)
        summary = DatasetSummary(
            dataset=dataset,
            teacher_test_accuracy=teacher.test_metrics["accuracy"],
            teacher_test_f1=teacher.test_metrics["f1_macro"],
            student_test_accuracy=champion.test_metrics["accuracy"],
            student_test_f1=champion.test_metrics["f1_macro"],
            alpha=champion.alpha,
            temperature=champion.temperature,
            widths="-".join(map(str, champion.widths)),
            teacher_params=teacher.params,
            student_params=champion.params,
            param_ratio=champion.params / teacher.params,
            teacher_reused=teacher.reused,
            trials=champion.num_trials,
            seconds=time.perf_counter() - started,
        )
        tracker.set_tags(parent, {"kdray.teacher_run": teacher.run_id,
                                  "kdray.champion_run": champion.trial_run_id})
        tracker.log_metrics(parent, {k: v for k, v in asdict(summary).items()
                                     if isinstance(v, float | int) and not isinstance(v, bool)})
    except BaseException:
        tracker.end_run(parent, "FAILED")
        raise
    tracker.end_run(parent)
    return summary


def format_summary(rows: list[DatasetSummary]) -> str:
    """A Markdown table: teacher vs best student per dataset."""
    header = ("| dataset | teacher acc | teacher F1 | student acc | student F1 | alpha | T | widths "
              "| student/teacher params |\n|---|---|---|---|---|---|---|---|---|")
    lines = [header]
    for r in rows:
        lines.append(
            f"| {r.dataset} | {r.teacher_test_accuracy:.3f} | {r.teacher_test_f1:.3f} "
            f"| {r.student_test_accuracy:.3f} | {r.student_test_f1:.3f} | {r.alpha:.2f} "
            f"| {r.temperature:.2f} | {r.widths} | {r.param_ratio:.4f} |"
        )
    return "\n".join(lines)


def _write_summary(rows: list[DatasetSummary], ws: Workspace) -> None:
    ws.reports.mkdir(parents=True, exist_ok=True)
    (ws.reports / "summary.md").write_text(format_summary(rows) + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(asdict(rows[0])))
    writer.writeheader()
    writer.writerows(asdict(r) for r in rows)
    (ws.reports / "summary.csv").write_text(buf.getvalue())


def run_pipeline(cfg: ExperimentConfig, ws: Workspace) -> list[DatasetSummary]:
    """Run every configured dataset; write ``reports/summary.{md,csv}`` in the workspace."""
    ws.create()
    tracker = Tracker.open(cfg.mlflow, ws)
    log.info("workspace %s; MLflow %s (experiment %s)", ws.root, tracker.tracking_uri, cfg.mlflow.experiment)
    rows: list[DatasetSummary] = []
    with ray_session(cfg.ray, ws):
        for dataset in cfg.data.datasets:
            rows.append(run_dataset(cfg, dataset, ws, tracker))
    _write_summary(rows, ws)
    return rows
