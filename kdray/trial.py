"""One KD student's training: what runs inside a Tune trial (and every other student job).

:func:`train_student` trains one student (a trial, a champion retrain, the CE-only baseline) and
reports after every epoch; :func:`kd_trial` is the function Tune runs per trial (registered by
:mod:`kdray.sweep`, imported by module path in the trial's worker): one :func:`train_student` run
with its own MLflow run.

Trials read the teacher's cached training logits (``kd.teacher_logits: cache``), so no trial runs
the teacher. Each trial reports its best-epoch weights as its checkpoint, and that model's
transparency score (:mod:`kdray.explain.scoring`, on the dataset's scored validation images) at
each ASHA rung and at its last epoch (:func:`score_epochs`).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray import tune

from kdray.config import ExperimentConfig, widths_for
from kdray.data.prepare import Split
from kdray.data.record import DataRecord
from kdray.devices import assigned_device, use_assigned_threads
from kdray.engine import channels_last, evaluate, make_loader, seed_everything, train_epoch
from kdray.explain.scoring import ScoringSet, score_model
from kdray.losses import KDLoss
from kdray.models import (
    ModelSpec,
    build_model,
    count_flops,
    count_params,
    load_model,
    load_model_files,
    save_model,
)
from kdray.pareto import rungs
from kdray.provenance import SOURCE_TAG, source_digest
from kdray.tracking import TAG_TRIAL, Tracker

__all__ = [
    "TRANSPARENCY",
    "StudentJob",
    "TrialOutcome",
    "kd_trial",
    "score_epochs",
    "train_student",
    "trial_hyperparameters",
    "two_objectives",
]

TRAIN_STATE = "train_state.pt"
VAL_BATCH = 32  # a student's validation batch: larger ones run slower on a CPU (cache)
TRANSPARENCY = "transparency"  # the best epoch's model's score (kdray.explain.scoring)


@dataclass
class TrialOutcome:
    """One finished trial, as the champion selection sees it."""

    run_id: str
    config: dict[str, Any]
    widths: list[int]
    lr: float
    best_val_accuracy: float
    params: int
    flops: int
    checkpoint: Any  # ray.tune.Checkpoint holding the best epoch's model
    epochs_run: int = -1  # fewer than student.epochs: stopped early by the scheduler
    # The checkpoint's transparency (NaN: not scored) and its parts (``transparency.*``).
    transparency: float = float("nan")
    transparency_parts: dict[str, float] = field(default_factory=dict)


@dataclass
class StudentJob:
    """What every trial needs besides its hyper-parameters (shipped once via the object store).

    Exactly one of ``teacher_logits`` (the cache: logits on the training split, row-aligned with
    ``train``) and ``teacher_files`` (the saved teacher's files as bytes, run live on every batch)
    is set. Both travel with the job through Ray's object store: a trial on any node needs no
    path on the driver's disk.
    """

    cfg: ExperimentConfig
    dataset: str
    class_names: list[str]
    image_size: int
    train: Split
    val: Split
    teacher_logits: np.ndarray | None = None
    teacher_files: dict[str, bytes] | None = None
    tracker: Tracker | None = None
    parent_run_id: str | None = None
    # The splits as MLflow dataset inputs (kdray.data.mlflow_inputs), logged on every student run.
    data_inputs: list[Any] = field(default_factory=list)
    # What the students saw (kdray.data.record): saved with the champion, tagged on its version.
    record: DataRecord | None = None
    # The validation images every student is scored on, with the teacher's maps of them.
    scoring: ScoringSet | None = None
    # The epochs (0-based) a trial scores its best model after; None: score_epochs(cfg). (The
    # sweep benchmark scores where the default scheduler would, with the scheduler off.)
    score_at: frozenset[int] | None = None

    def inputs(self, *splits: str) -> list[Any]:
        """The dataset inputs of these splits (context tag ``mlflow.data.context``)."""
        return [d for d in self.data_inputs if any(t.value in splits for t in d.tags)]

    def student_spec(self, widths: list[int]) -> ModelSpec:
        """The spec of this dataset's student with these block widths."""
        return ModelSpec(
            kind="student",
            num_classes=len(self.class_names),
            image_size=self.image_size,
            class_names=self.class_names,
            widths=widths,
            dataset=self.dataset,
        )


ReportFn = Callable[[dict[str, Any], Path], None]


def _teacher_source(
    job: StudentJob,
    alpha: float,
    device: torch.device,
) -> tuple[tuple[np.ndarray, ...], Callable | None]:
    """Extra loader columns and a live teacher, per the job's logit source (none when alpha == 1)."""
    if alpha >= 1.0:
        return (), None
    if job.teacher_logits is not None:
        return (job.teacher_logits,), None
    if job.teacher_files is None:
        raise ValueError("a KD student with alpha < 1 needs teacher_logits or teacher_files")
    teacher, _ = load_model_files(job.teacher_files, device=device)
    teacher.requires_grad_(False)
    # The batches arrive channels-last (train_epoch's augment): the teacher in the same layout,
    # or oneDNN converts at every layer.
    return (), teacher.to(memory_format=torch.channels_last)


def train_student(
    job: StudentJob,
    alpha: float,
    temperature: float,
    widths: list[int],
    report: ReportFn | None = None,
    run_id: str | None = None,
    lr: float | None = None,
    seed: int | None = None,
    best_model_out: torch.nn.Module | None = None,
    resume_from: Path | None = None,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Train one KD student; after every epoch call ``report(metrics, checkpoint_dir)``.

    Every student job (trial, champion retraining, baseline) trains where Ray placed it: on the
    GPU Ray assigned to this worker or task, else on the CPU (:func:`kdray.devices.assigned_device`),
    with mixed precision and pinned host memory on CUDA. The best epoch is kept on the CPU.

    The checkpoint directory holds the best epoch's model (``load_model`` reads it) and
    ``train_state.pt`` (current weights, optimiser, epoch, best accuracy) to resume from.

    Args:
        lr: learning rate (default ``student.lr``); seed: default the config's seed.
        best_model_out: a module of the same spec that receives the best epoch's weights.
        resume_from: a checkpoint directory written by an earlier report: training goes on
            from the epoch after it, exactly as if it had not stopped.
        device: overrides the assigned device.

    With ``report`` (a Tune trial) and a job with a scoring set, the best epoch's model is scored
    for transparency at every epoch of :func:`score_epochs` (the scheduler's rungs, the last
    epoch); each later report carries that score (``transparency``, ``transparency.*``).

    Returns:
        The last epoch's metrics plus ``best_val_accuracy``, ``best_epoch``, ``params`` and
        ``flops`` (per image at the input size).
    """
    cfg, s = job.cfg, job.cfg.student
    seed = cfg.seed if seed is None else seed
    seed_everything(seed)
    spec = job.student_spec(widths)
    model = build_model(spec)
    # The best epoch so far: what each report's directory holds.
    best_model = best_model_out if best_model_out is not None else build_model(spec)
    params, flops = count_params(model), count_flops(model, job.image_size)
    device = torch.device(device) if device is not None else assigned_device()
    # Channels-last: oneDNN's (and cuDNN's) fast layout. On these 2 cores a student epoch takes
    # about 0.75x the time, validation (batch VAL_BATCH) about 0.3x (benchmarks/sweep_throughput.py).
    model.to(device, memory_format=torch.channels_last)
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if cuda else None
    loss_fn = KDLoss(alpha, temperature)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr or s.lr, weight_decay=s.weight_decay)
    extra_columns, live_teacher = _teacher_source(job, alpha, device)
    loader = make_loader(
        (job.train.images, job.train.labels, *extra_columns),
        s.batch_size,
        shuffle=True,
        seed=seed,
        pin_memory=cuda,
    )

    def kd(logits: torch.Tensor, y: torch.Tensor, extras: tuple, x: torch.Tensor) -> dict:
        if live_teacher is not None:
            with torch.no_grad():
                teacher_logits = live_teacher(x)
        else:
            teacher_logits = extras[0] if extras else None
        return loss_fn(logits, teacher_logits, y)

    best_acc, best_epoch, start = -1.0, -1, 0
    if resume_from is not None:
        state = torch.load(Path(resume_from) / TRAIN_STATE, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        best_model.load_state_dict(load_model(resume_from)[0].state_dict())
        best_acc, best_epoch, start = state["best_acc"], state["best_epoch"], state["epoch"] + 1
    # A restarted trial trains again the epochs after its last registered checkpoint (all of
    # them if none registered before the kill): epochs its run already has stay as logged first.
    logged = (
        job.tracker.logged_steps(run_id, "val_accuracy")
        if job.tracker is not None and run_id is not None
        else set()
    )
    metrics: dict[str, Any] = {}
    to_score = (
        (job.score_at if job.score_at is not None else score_epochs(cfg))
        if report is not None and job.scoring is not None
        else set()
    )
    # The best model's latest transparency figures, carried in every later report (Tune wants
    # each objective in every result: NaN until the first score, which no scheduler reads).
    scored: dict[str, float] = {TRANSPARENCY: float("nan")} if to_score else {}
    for epoch in range(start, s.epochs):
        loader.generator.manual_seed(seed * 100_003 + epoch)  # the epoch's order, also on resume
        started = time.perf_counter()
        stats = train_epoch(model, loader, kd, optimizer, device, scaler, augment=channels_last())
        seconds = time.perf_counter() - started
        val_metrics, _ = evaluate(model, job.val, job.class_names, device, batch_size=VAL_BATCH)
        if val_metrics["accuracy"] > best_acc:
            best_acc, best_epoch = val_metrics["accuracy"], epoch
            best_model.load_state_dict(model.state_dict())
        metrics = {
            "train_loss": stats["loss"],
            "train_hard": stats["hard"],
            "train_soft": stats["soft"],
            "train_accuracy": stats["accuracy"],
            "val_loss": val_metrics["loss"],
            "val_accuracy": val_metrics["accuracy"],
            "epoch_seconds": seconds,
        }
        # The running summary goes with every epoch: a trial that the scheduler stops after
        # any report has its MLflow run complete already.
        metrics.update(
            best_val_accuracy=best_acc, best_epoch=best_epoch, params=params, flops=flops
        )
        fresh: dict[str, float] = {}
        if epoch in to_score:
            started = time.perf_counter()
            score = score_model(
                best_model,
                job.scoring,
                cfg.transparency,
                cfg.explain.cam_method,
                agreement=alpha < 1.0,
                seed=seed,
            )
            fresh = {**score.metrics(), "transparency_seconds": time.perf_counter() - started}
            scored = fresh
        if job.tracker is not None and run_id is not None and epoch not in logged:
            job.tracker.log_metrics(run_id, {**metrics, **fresh}, step=epoch)
        metrics.update(scored)
        metrics["epoch"] = epoch
        if report is not None:
            with tempfile.TemporaryDirectory() as tmp:
                save_model(best_model, spec, tmp)  # the best epoch, also what a resume restores
                torch.save(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "best_acc": best_acc,
                        "best_epoch": best_epoch,
                        "epoch": epoch,
                    },
                    Path(tmp) / TRAIN_STATE,
                )
                report(metrics, Path(tmp))
    return metrics


def two_objectives(cfg: ExperimentConfig) -> bool:
    """Does the search optimise transparency beside accuracy (``tune.champion: transparent``)?"""
    return cfg.tune.champion == "transparent"


def score_epochs(cfg: ExperimentConfig) -> set[int]:
    """The epochs (0-based) after which a trial scores its best model: each rung its scheduler
    judges at (two objectives), and the last."""
    epochs = cfg.student.epochs
    out = {epochs - 1}
    if cfg.tune.scheduler == "asha" and two_objectives(cfg):
        grace = min(cfg.tune.grace_period, epochs)
        out |= {int(m) - 1 for m in rungs(grace, cfg.tune.reduction_factor, epochs)}
    return out


def trial_hyperparameters(config: dict[str, Any], cfg: ExperimentConfig) -> tuple[list[int], float]:
    """A trial's (widths, lr): widths fixed by the search (the baseline's, ``"16-32-64"``), else
    explicit ``student.widths``, else the searched base/growth/depth."""
    s = cfg.student
    if "widths" in config:
        widths = [int(w) for w in str(config["widths"]).split("-")]
    elif s.widths is not None:
        widths = s.resolved_widths()
    else:
        widths = widths_for(
            int(config["base_width"]), float(config["growth"]), int(config["depth"])
        )
    return widths, float(config.get("lr", s.lr))


def kd_trial(config: dict[str, Any], job: StudentJob, role: str = "trial") -> None:
    """One Tune trial: a :func:`train_student` run with its own MLflow run (tag ``kdray.role``)."""
    cfg = job.cfg
    use_assigned_threads(default=max(1, int(cfg.tune.cpus_per_trial)))  # the trial's CPUs
    widths, lr = trial_hyperparameters(config, cfg)
    tracker = job.tracker
    trial_id = tune.get_context().get_trial_id()
    node_id = ray.get_runtime_context().get_node_id()
    # A trial restarted after a failure or a driver restart (Tuner.restore) keeps its run.
    run_id, resumed = tracker.resume_or_start_run(
        f"{role}-{job.dataset}-{trial_id}",
        job.dataset,
        role,
        job.parent_run_id,
        tags={TAG_TRIAL: trial_id},
    )
    # A trial restarted after a failure resumes its run: what the failed attempt did not log
    # yet (it may have died between starting the run and logging its inputs) is logged now.
    run = tracker.client.get_run(run_id) if resumed else None
    logged = run.data.params if run is not None else {}
    if "epochs" not in logged or not any(key.startswith("cfg.") for key in logged):
        tracker.log_params(
            run_id,
            {
                "alpha": config["alpha"],
                "temperature": config["temperature"],
                "widths": "-".join(map(str, widths)),
                "depth": len(widths),
                "lr": lr,
                "epochs": cfg.student.epochs,
                "teacher_logits": cfg.kd.teacher_logits if config["alpha"] < 1 else "none",
            },
        )
        tracker.log_config(run_id, cfg.to_dict())
    if run is None or not run.inputs.dataset_inputs:
        tracker.log_inputs(run_id, job.inputs("train", "val"))
    tracker.set_tags(run_id, {"kdray.node_id": node_id, SOURCE_TAG: source_digest()})
    checkpoint = tune.get_checkpoint()

    def report(metrics: dict[str, Any], best_dir: Path) -> None:
        tune.report(
            {**metrics, "mlflow_run_id": run_id},
            checkpoint=tune.Checkpoint.from_directory(best_dir),
        )

    try:
        if checkpoint is not None:
            with checkpoint.as_directory() as resume_dir:
                train_student(
                    job,
                    config["alpha"],
                    config["temperature"],
                    widths,
                    report,
                    run_id,
                    lr,
                    resume_from=Path(resume_dir),
                )
        else:
            train_student(job, config["alpha"], config["temperature"], widths, report, run_id, lr)
    except SystemExit:
        # Tune ends a trial that its scheduler stops (ASHA, or max_t reached) with sys.exit(0)
        # inside tune.report, and may end the process right after: run_sweep closes the run.
        raise
    except BaseException as exc:
        # Tune may still retry the trial (tune.max_failures): run_sweep settles the final status.
        tracker.end_run(run_id, "FAILED", error=exc)
        raise
    tracker.end_run(run_id)
