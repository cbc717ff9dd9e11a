"""KD sweep: Ray Tune searches alpha, temperature and student width; one MLflow run per trial.

Trials read the teacher's cached training logits, so no trial runs the teacher. The best trial
(validation accuracy; fewer parameters on a tie) is the dataset's champion: it is scored on the
test split and saved to ``<workspace>/champions/<dataset>/``.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray import tune

from kdray.config import ExperimentConfig
from kdray.data.prepare import PreparedData, Split
from kdray.engine import evaluate, make_loader, seed_everything, train_epoch
from kdray.evaluation import evaluate_and_log
from kdray.losses import KDLoss
from kdray.models import ModelSpec, build_model, count_params, load_model, save_model
from kdray.teacher import TeacherResult
from kdray.tracking import Tracker
from kdray.workspace import Workspace

__all__ = ["StudentJob", "SweepResult", "run_sweep", "select_best", "train_student"]


@dataclass
class SweepResult:
    trial_run_id: str
    model_dir: Path
    alpha: float
    temperature: float
    widths: list[int]
    params: int
    val_accuracy: float
    test_metrics: dict[str, Any]
    num_trials: int


@dataclass
class StudentJob:
    """What every trial needs besides its hyper-parameters (shipped once via the object store).

    Exactly one of ``teacher_logits`` (the cache: logits on the training split, row-aligned with
    ``train``) and ``teacher_dir`` (a saved teacher, run live on every batch) is set.
    """

    cfg: ExperimentConfig
    dataset: str
    class_names: list[str]
    image_size: int
    train: Split
    val: Split
    teacher_logits: np.ndarray | None = None
    teacher_dir: str | None = None
    tracker: Tracker | None = None
    parent_run_id: str | None = None


ReportFn = Callable[[dict[str, Any], Path], None]


def _teacher_source(job: StudentJob, alpha: float) -> tuple[tuple[np.ndarray, ...], Callable | None]:
    """Extra loader columns and a live teacher, per the job's logit source (none when alpha == 1)."""
    if alpha >= 1.0:
        return (), None
    if job.teacher_logits is not None:
        return (job.teacher_logits,), None
    if job.teacher_dir is None:
        raise ValueError("a KD student with alpha < 1 needs teacher_logits or teacher_dir")
    teacher, _ = load_model(job.teacher_dir)
    teacher.requires_grad_(False)
    return (), teacher


def train_student(
    job: StudentJob, alpha: float, temperature: float, widths: list[int],
    report: ReportFn | None = None, run_id: str | None = None,
) -> dict[str, Any]:
    """Train one KD student; after every epoch call ``report(metrics, best_model_dir)``.

    Returns:
        The last epoch's metrics plus ``best_val_accuracy``, ``best_epoch`` and ``params``.
    """
    cfg, s = job.cfg, job.cfg.student
    seed_everything(cfg.seed)
    spec = ModelSpec(kind="student", num_classes=len(job.class_names), image_size=job.image_size,
                     class_names=job.class_names, widths=widths, dataset=job.dataset)
    model = build_model(spec)
    best_model = build_model(spec)  # the best epoch so far: what each report's directory holds
    params = count_params(model)
    loss_fn = KDLoss(alpha, temperature)
    optimizer = torch.optim.Adam(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    extra_columns, live_teacher = _teacher_source(job, alpha)
    loader = make_loader((job.train.images, job.train.labels, *extra_columns), s.batch_size,
                         shuffle=True, seed=cfg.seed)

    def kd(logits: torch.Tensor, y: torch.Tensor, extras: tuple, x: torch.Tensor) -> dict:
        if live_teacher is not None:
            with torch.no_grad():
                teacher_logits = live_teacher(x)
        else:
            teacher_logits = extras[0] if extras else None
        return loss_fn(logits, teacher_logits, y)

    best_acc, best_epoch = -1.0, -1
    metrics: dict[str, Any] = {}
    for epoch in range(s.epochs):
        started = time.perf_counter()
        stats = train_epoch(model, loader, kd, optimizer)
        seconds = time.perf_counter() - started
        val_metrics, _ = evaluate(model, job.val, job.class_names)
        if val_metrics["accuracy"] > best_acc:
            best_acc, best_epoch = val_metrics["accuracy"], epoch
            best_model.load_state_dict(model.state_dict())
        metrics = {"train_loss": stats["loss"], "train_hard": stats["hard"],
                   "train_soft": stats["soft"], "train_accuracy": stats["accuracy"],
                   "val_loss": val_metrics["loss"], "val_accuracy": val_metrics["accuracy"],
                   "epoch_seconds": seconds}
        if job.tracker is not None and run_id is not None:
            job.tracker.log_metrics(run_id, metrics, step=epoch)
        metrics = {**metrics, "epoch": epoch, "best_val_accuracy": best_acc,
                   "best_epoch": best_epoch, "params": params}
        if report is not None:
            with tempfile.TemporaryDirectory() as tmp:
                save_model(best_model, spec, tmp)
                report(metrics, Path(tmp))
    return metrics


def _kd_trial(config: dict[str, Any], job: StudentJob) -> None:
    """One Tune trial: a :func:`train_student` run with its own MLflow run."""
    cfg = job.cfg
    torch.set_num_threads(max(1, int(cfg.tune.cpus_per_trial)))
    widths = [int(w) for w in config["widths"].split("-")]
    tracker = job.tracker
    trial_id = tune.get_context().get_trial_id()
    run_id = tracker.start_run(f"trial-{job.dataset}-{trial_id}", job.dataset, "trial",
                               job.parent_run_id, tags={"kdray.trial_id": trial_id})
    tracker.log_params(run_id, {"alpha": config["alpha"], "temperature": config["temperature"],
                                "widths": widths, "depth": len(widths), "lr": cfg.student.lr,
                                "epochs": cfg.student.epochs,
                                "teacher_logits": cfg.kd.teacher_logits})
    tracker.log_config(run_id, cfg.to_dict())

    def report(metrics: dict[str, Any], best_dir: Path) -> None:
        tune.report({**metrics, "mlflow_run_id": run_id},
                    checkpoint=tune.Checkpoint.from_directory(best_dir))

    try:
        final = train_student(job, config["alpha"], config["temperature"], widths, report, run_id)
        tracker.log_metrics(run_id, {k: final[k] for k in ("best_val_accuracy", "best_epoch", "params")})
    except BaseException:
        tracker.end_run(run_id, "FAILED")
        raise
    tracker.end_run(run_id)


def _widths_key(widths: list[int]) -> str:
    return "-".join(str(w) for w in widths)


def select_best(candidates: list[dict[str, Any]]) -> dict[str, Any]:
    """Highest ``best_val_accuracy``; on a tie, fewer ``params``.

    Raises:
        RuntimeError: no candidate (every trial failed).
    """
    if not candidates:
        raise RuntimeError("no KD trial finished; see the Ray Tune errors above")
    return max(candidates, key=lambda c: (c["best_val_accuracy"], -c["params"]))


def run_sweep(
    cfg: ExperimentConfig, data: PreparedData, teacher: TeacherResult, ws: Workspace,
    tracker: Tracker, parent_run_id: str | None = None, name: str | None = None,
) -> SweepResult:
    """Search KD students for one dataset with Ray Tune and score the champion on test."""
    dataset = data.spec.id
    t = cfg.tune
    cached = cfg.kd.teacher_logits == "cache"
    job = StudentJob(
        cfg, dataset, list(data.spec.classes), data.image_size, data.splits["train"],
        data.splits["val"],
        teacher_logits=teacher.train_logits().astype(np.float32) if cached else None,
        teacher_dir=None if cached else str(teacher.model_dir),
        tracker=tracker, parent_run_id=parent_run_id,
    )
    trainable = tune.with_resources(
        tune.with_parameters(_kd_trial, job=job),
        {"cpu": t.cpus_per_trial, "gpu": t.gpus_per_trial},
    )
    from ray.tune.search.basic_variant import BasicVariantGenerator

    tuner = tune.Tuner(
        trainable,
        param_space={
            "alpha": tune.uniform(*t.alpha),
            "temperature": tune.uniform(*t.temperature),
            # Widths travel as "16-32-64-128-128": Tune treats list values as nested spaces.
            "widths": tune.choice([_widths_key(cfg.student.resolved_widths(b)) for b in t.base_width]),
        },
        tune_config=tune.TuneConfig(
            metric="best_val_accuracy", mode="max", num_samples=t.num_samples,
            max_concurrent_trials=t.max_concurrent_trials,
            # The configured kd point (the paper's setting) is always the first trial.
            search_alg=BasicVariantGenerator(
                random_state=t.seed,
                points_to_evaluate=[{"alpha": cfg.kd.alpha, "temperature": cfg.kd.temperature,
                                     "widths": _widths_key(cfg.student.resolved_widths())}],
            ),
        ),
        run_config=tune.RunConfig(
            name=name or f"sweep-{dataset}",
            storage_path=ws.ray_storage(cfg.ray.storage_path),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            verbose=1,
        ),
    )
    grid = tuner.fit()
    candidates = []
    for result in grid:
        if result.error is None and result.metrics and result.checkpoint is not None:
            candidates.append({**result.metrics, "config": result.config, "checkpoint": result.checkpoint})
    best = select_best(candidates)
    with best["checkpoint"].as_directory() as d:
        model, spec = load_model(d)
        target = ws.champions / dataset
        shutil.rmtree(target, ignore_errors=True)
        save_model(model, spec, target)
    run_id = best["mlflow_run_id"]
    test_metrics = evaluate_and_log(model, data.splits["test"], spec.class_names, tracker, run_id,
                                    title=f"student · {dataset}")
    tracker.set_tags(run_id, {"kdray.champion": "true"})
    tracker.log_artifacts(run_id, str(target), "model")
    return SweepResult(
        trial_run_id=run_id, model_dir=target, alpha=best["config"]["alpha"],
        temperature=best["config"]["temperature"], widths=spec.widths, params=int(best["params"]),
        val_accuracy=float(best["best_val_accuracy"]),
        test_metrics={k: v for k, v in test_metrics.items() if k != "per_class"},
        num_trials=len(grid),
    )
