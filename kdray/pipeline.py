"""The main job: for each dataset, data -> teacher (Ray Train) -> KD sweep (Ray Tune) -> champion."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path

from kdray.champion import ChampionResult, crown_champion
from kdray.config import ExperimentConfig
from kdray.data.mlflow_inputs import split_inputs
from kdray.data.prepare import PreparedData, preflight, prepare_dataset
from kdray.data.record import record_for
from kdray.pareto_report import log_pareto
from kdray.registry import registered_name
from kdray.search_findings import log_findings
from kdray.session import ray_session
from kdray.summary import DatasetSummary, paired_gain, paired_transparency, write_summary
from kdray.sweep import make_job, run_sweep, seed_point
from kdray.teacher import train_teacher
from kdray.tracking import Tracker
from kdray.transparency import report_dataset
from kdray.workspace import Workspace

__all__ = ["log_data", "run_dataset", "run_key", "run_pipeline", "state_file"]

log = logging.getLogger("kdray")


SANITY_KEYS = (".randomisation.", ".random_logit.", ".blank_test.", "localisation_test.images")


def run_key(cfg: ExperimentConfig) -> str:
    """Identifies what a dataset's run trains and selects (not where it runs, logs, or how its
    report explains: of ``explain``, only ``cam_method``, which the champion is selected by)."""
    data = cfg.to_dict()
    data["data"].pop("datasets")  # the state is per dataset: the list around it does not matter
    kept = {k: v for k, v in data.items() if k not in ("ray", "mlflow", "explain", "export")}
    kept["cam_method"] = data["explain"]["cam_method"]
    blob = json.dumps(kept, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def state_file(ws: Workspace, dataset: str) -> Path:
    """Where a dataset's run state is kept in ``ws`` (what ``--resume`` and the rebuild read)."""
    return ws.root / "state" / f"{dataset}.json"


def _save_state(ws: Workspace, dataset: str, state: dict) -> None:
    path = state_file(ws, dataset)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path)


def log_data(tracker: Tracker, run_id: str, data: PreparedData) -> None:
    """The splits as MLflow dataset inputs and their sizes as params; files left out as
    unreadable (``data.skip_unreadable``) as param ``n_unreadable`` and artifact
    ``data/unreadable_files.json`` (path and reason each)."""
    manifest = data.manifest
    tracker.log_inputs(run_id, split_inputs(data))
    tracker.log_params(run_id, {f"n_{k}": v for k, v in manifest.counts().items()})
    if manifest.skipped:
        tracker.log_params(run_id, {"n_unreadable": len(manifest.skipped)})
        tracker.client.log_dict(
            run_id,
            {"root": manifest.root, "skipped": manifest.skipped},
            "data/unreadable_files.json",
        )


def _export_champion(
    cfg: ExperimentConfig, data: PreparedData, ws: Workspace, tracker: Tracker, dataset: str
) -> None:
    """The champion as ONNX beside its registered version; a failed parity check is logged, not
    fatal (the run's models and results stand without the edge copy)."""
    from kdray.edge.export import ExportError
    from kdray.edge.publish import export_registered

    images = data.splits["test"].images[: cfg.export.parity_images]
    try:
        export, registered = export_registered(
            registered_name(dataset), "champion", images, ws.edge / dataset, tracker.tracking_uri
        )
    except ExportError as exc:
        log.warning("%s: no ONNX copy of the champion: %s", dataset, exc)
        return
    log.info(
        "%s: champion v%s exported to ONNX in %.1f s (%s): %s",
        dataset,
        registered.version,
        export.seconds,
        export.directory,
        export.parity.describe(),
    )


def run_dataset(
    cfg: ExperimentConfig, dataset: str, ws: Workspace, tracker: Tracker, resume: bool = False
) -> DatasetSummary:
    """One dataset end to end. With ``resume``, a finished dataset of the same config is returned
    as it was, and an unfinished one continues in its parent run and Tune experiment; stages
    that finished (teacher, sweep + champion) are not redone.

    Without ``resume``, an unfinished earlier run of this dataset in ``ws`` is abandoned: its
    parent run and the children still RUNNING are marked KILLED.
    """
    key = run_key(cfg)
    state_path = state_file(ws, dataset)
    state = json.loads(state_path.read_text()) if state_path.is_file() else None
    if (
        state
        and not state.get("summary")
        and not resume
        and tracker.run_exists(state["parent_run_id"])
    ):
        tracker.abandon(state["parent_run_id"])
    if not (
        resume and state and state["run_key"] == key and tracker.run_exists(state["parent_run_id"])
    ):
        state = None
    if state and state.get("summary"):
        log.info("%s: finished in an earlier run (%s); not redone", dataset, state["parent_run_id"])
        return DatasetSummary(**state["summary"])
    started = time.perf_counter()
    data = prepare_dataset(cfg.data, dataset, ws)
    log.info("%s: %s images (train/val/test)", dataset, data.manifest.counts())
    fraction = cfg.data.student_fraction(dataset)
    n_students = len(data.student_indices(fraction, cfg.data.split_seed))
    if fraction < 1.0:
        log.info(
            "%s: the students train on %d of the %d training images "
            "(data.synthetic.student_fraction %.2f); the teacher on all of them",
            dataset,
            n_students,
            len(data.splits["train"]),
            fraction,
        )
    if state:
        parent, sweep_name = state["parent_run_id"], state["sweep"]
        tracker.client.update_run(parent, status="RUNNING")
        log.info("%s: resuming run %s", dataset, parent)
    else:
        parent = tracker.start_run(
            dataset, dataset, "parent", tags={"kdray.manifest": data.manifest.fingerprint[:12]}
        )
        sweep_name = f"sweep-{dataset}-{data.key}-{time.strftime('%Y%m%d-%H%M%S')}"
        tracker.log_config(parent, cfg.to_dict())
        log_data(tracker, parent, data)
        tracker.log_params(parent, {"n_train_students": n_students})
    # The run's config and what its models saw (kdray.data.record): what `tune/report.py`,
    # given no --config, rebuilds the reports with.
    base = {
        "run_key": key,
        "parent_run_id": parent,
        "sweep": sweep_name,
        "config": cfg.to_dict(),
        "data": record_for(cfg.data, data, student=True).to_dict(),
    }
    if not state:
        _save_state(ws, dataset, base)
    try:
        teacher = train_teacher(cfg, data, ws, tracker, parent)
        log.info(
            "%s: teacher %s, test accuracy %.3f",
            dataset,
            "reused" if teacher.reused else "trained",
            teacher.test_metrics["accuracy"],
        )
        if state and state.get("champion"):
            champion, trials = ChampionResult(**state["champion"]), state["trials"]
            log.info("%s: sweep and champion finished in an earlier run; not redone", dataset)
        else:
            job = make_job(cfg, data, teacher, tracker, parent)
            outcomes = run_sweep(job, ws, name=sweep_name, restore=state is not None)
            champion = crown_champion(
                job,
                outcomes,
                data.splits["test"],
                ws,
                tracker,
                parent,
                baseline_sweep=f"{sweep_name}-baseline",
                restore=state is not None,
            )
            trials = len(outcomes)
            _save_state(ws, dataset, {**base, "champion": asdict(champion), "trials": trials})
        # Before the report: it shows the search's panels (search.md, search.png).
        findings = log_findings(
            tracker,
            parent,
            champion.trial_run_id,
            ws.reports / dataset,
            dataset,
            cfg.seed,
            seed_point=seed_point(cfg),
        )
        log.info("%s: %s", dataset, findings.sentence())
        pareto = log_pareto(
            tracker,
            parent,
            champion.trial_run_id,
            champion.accuracy_pick_run_id or champion.trial_run_id,
            ws.reports / dataset,
            dataset,
            champion.rule,
            cfg.tune.selection_tolerance,
        )
        log.info("%s: %s", dataset, pareto.sentence())
        # Before the report: it finds the learning curves through these tags.
        tracker.set_tags(
            parent,
            {
                "kdray.teacher_run": teacher.run_id,
                "kdray.champion_run": champion.run_id,
                "kdray.baseline_run": champion.baseline_run_id,
            },
        )
        if cfg.export.onnx:
            _export_champion(cfg, data, ws, tracker, dataset)
        agreement: dict[str, float] = {}
        sanity: dict[str, float] = {}
        if cfg.explain.report:
            log.info("%s: transparency report (teacher vs champion)", dataset)
            report = report_dataset(
                cfg,
                data,
                teacher.model_dir,
                ws.champions / dataset,
                ws,
                tracker,
                parent,
                champion.run_id,
            )
            agreement = {k: v for k, v in report.metrics.items() if k.startswith("agreement.")}
            sanity = {k: v for k, v in report.metrics.items() if any(p in k for p in SANITY_KEYS)}
        seeds = champion.champion_seeds
        student_acc = seeds.get("test_accuracy_mean", champion.test_metrics["accuracy"])
        summary = DatasetSummary(
            dataset=dataset,
            teacher_test_accuracy=teacher.test_metrics["accuracy"],
            teacher_test_f1=teacher.test_metrics["f1_macro"],
            student_test_accuracy=student_acc,
            student_test_f1=seeds.get("test_f1_macro_mean", champion.test_metrics["f1_macro"]),
            baseline_test_accuracy=champion.baseline_test["test_accuracy_mean"],
            baseline_test_f1=champion.baseline_test["test_f1_macro_mean"],
            kd_gain=student_acc - champion.baseline_test["test_accuracy_mean"],
            alpha=champion.alpha,
            temperature=champion.temperature,
            widths="-".join(map(str, champion.widths)),
            lr=champion.lr,
            teacher_params=teacher.params,
            student_params=champion.params,
            teacher_flops=teacher.flops,
            student_flops=champion.flops,
            seeds=" ".join(map(str, champion.seeds)),
            student_test_accuracy_std=seeds.get("test_accuracy_std", 0.0),
            baseline_test_accuracy_std=champion.baseline_test["test_accuracy_std"],
            teacher_reused=teacher.reused,
            trials=trials,
            seconds=time.perf_counter() - started,
            parent_run_id=parent,
            teacher_test_ece=teacher.test_metrics.get("ece", float("nan")),
            student_test_ece=seeds.get(
                "test_ece_mean", champion.test_metrics.get("ece", float("nan"))
            ),
            baseline_test_ece=champion.baseline_test.get("test_ece_mean", float("nan")),
            **paired_gain(champion),
            baseline_lr=champion.baseline_lr,
            baseline_trials=champion.baseline_trials,
            agreement=agreement,
            teacher_train_images=len(data.splits["train"]),
            student_train_images=n_students,
            search=findings.to_dict(),
            sanity=sanity,
            data_source=data.source.describe(),
            transparency={
                "rule": champion.rule,
                "cam_method": champion.cam_method,
                "cam_layer": champion.cam_layer,
                "pareto": pareto.to_dict(),
                "kd_vs_ce": paired_transparency(champion),
            },
        )
        tracker.log_metrics(
            parent,
            {
                **{
                    k: v
                    for k, v in asdict(summary).items()
                    if isinstance(v, float | int) and not isinstance(v, bool)
                },
                # KD against CE-only, per test-transparency figure (kd_vs_ce.<figure>.<stat>)
                **{
                    f"kd_vs_ce.{key.removeprefix('test_')}.{stat}": value
                    for key, pair in summary.transparency["kd_vs_ce"].items()
                    for stat, value in pair.items()
                    if math.isfinite(value)
                },
            },
        )
    except KeyboardInterrupt:
        tracker.end_run(parent, "KILLED")
        raise
    except BaseException:
        tracker.end_run(parent, "FAILED")
        raise
    tracker.end_run(parent)
    _save_state(
        ws,
        dataset,
        {
            **base,
            "teacher_dir": str(teacher.model_dir),
            "champion_run_id": champion.run_id,
            "summary": asdict(summary),
        },
    )
    return summary


def _run_concurrently(
    cfg: ExperimentConfig, ws: Workspace, tracker: Tracker, resume: bool
) -> list[DatasetSummary]:
    """``ray.max_concurrent_datasets`` dataset pipelines at once, each in a driver thread (Ray
    Train and Tune calls are thread-safe in the driver; Ray's scheduler shares the cluster
    between their trials). A dataset that fails does not stop the others: every one runs to its
    end, then the first error is raised (the finished ones keep their state for ``--resume``)."""
    datasets = list(cfg.data.datasets)
    workers = min(cfg.ray.max_concurrent_datasets, len(datasets))
    log.info("datasets %s: %d pipelines at once", ", ".join(datasets), workers)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kdray-dataset")
    futures = [pool.submit(run_dataset, cfg, dataset, ws, tracker, resume) for dataset in datasets]
    try:
        wait(futures)
    except BaseException:  # Ctrl-C: do not wait for the others; Ray's shutdown stops them
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    failed = [(d, f.exception()) for d, f in zip(datasets, futures, strict=True) if f.exception()]
    for dataset, exc in failed:
        log.error("%s: failed: %s: %s", dataset, type(exc).__name__, exc)
    if failed:
        raise failed[0][1]
    return [f.result() for f in futures]


def run_pipeline(
    cfg: ExperimentConfig, ws: Workspace, resume: bool = False, checked: bool = False
) -> list[DatasetSummary]:
    """Run every configured dataset; write ``reports/summary.{md,csv}`` in the workspace.

    Args:
        resume: continue the last run of the same config after the driver was stopped
            (Ctrl-C, lost node, kill): finished datasets are not redone, an unfinished sweep
            resumes from Tune's experiment state and its trials from their checkpoints.
    """
    # Every dataset's files are checked (and split) before MLflow or Ray start: an unreadable
    # file stops the run here, listed with the others, with nothing half started.
    if not checked:
        preflight(cfg.data, ws)
    tracker = Tracker.open(cfg.mlflow, ws)
    log.info(
        "workspace %s; MLflow %s (experiment %s)",
        ws.root,
        tracker.tracking_uri,
        cfg.mlflow.experiment,
    )
    with ray_session(cfg.ray, ws):
        if cfg.ray.max_concurrent_datasets > 1 and len(cfg.data.datasets) > 1:
            rows = _run_concurrently(cfg, ws, tracker, resume)
        else:
            rows = []
            for i, dataset in enumerate(cfg.data.datasets, 1):
                log.info("dataset %d/%d: %s", i, len(cfg.data.datasets), dataset)
                rows.append(run_dataset(cfg, dataset, ws, tracker, resume))
    write_summary(rows, ws)
    for row in rows:  # every dataset's parent run carries the whole run's table
        tracker.client.log_artifact(row.parent_run_id, str(ws.reports / "summary.md"))
        tracker.client.log_artifact(row.parent_run_id, str(ws.reports / "summary.csv"))
    return rows
