"""KD sweep: Ray Tune searches alpha, temperature, student width/depth and lr; one MLflow run each.

Trials read the teacher's cached training logits (``kd.teacher_logits: cache``), so no trial runs
the teacher. Each trial reports its best-epoch weights as its checkpoint, and that model's
transparency score (:mod:`kdray.explain.scoring`, on the dataset's scored validation images) at
each ASHA rung and at its last epoch; :mod:`kdray.champion` picks and scores the winner.

With ``tune.champion: transparent`` (the default) the search has two objectives, validation
accuracy and transparency: Optuna's TPE models both (its multi-objective mode) and
:class:`kdray.pareto.ParetoASHA` stops a trial at a rung only when enough trials there lie on
strictly better Pareto fronts, never for accuracy alone. With ``accuracy``: TPE and ASHA on
validation accuracy, transparency scored and reported only.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
import torch
from ray import tune

from kdray.config import ExperimentConfig, max_student_depth, widths_for
from kdray.console import eta
from kdray.data.mlflow_inputs import split_inputs
from kdray.data.prepare import PreparedData, Split
from kdray.data.record import DataRecord, record_for
from kdray.devices import assigned_device, use_assigned_threads
from kdray.engine import channels_last, evaluate, make_loader, seed_everything, train_epoch
from kdray.explain.gradcam import layer_cams
from kdray.explain.scoring import ScoringSet, cam_choice, score_model, scoring_set
from kdray.losses import KDLoss
from kdray.models import (
    ModelSpec,
    build_model,
    count_flops,
    count_params,
    load_model,
    load_model_files,
    model_files,
    save_model,
)
from kdray.pareto import ParetoASHA, rungs
from kdray.provenance import SOURCE_TAG, source_digest
from kdray.tracking import TAG_TRIAL, Tracker
from kdray.workspace import Workspace

if TYPE_CHECKING:  # a trial's process needs no teacher code (torchvision's augmentations)
    from kdray.teacher import TeacherResult

__all__ = [
    "StudentJob",
    "TrialOutcome",
    "baseline_search_space",
    "make_job",
    "run_sweep",
    "sampler_seed",
    "search_space",
    "seed_point",
    "train_student",
]

log = logging.getLogger("kdray")
TRAIN_STATE = "train_state.pt"
VAL_BATCH = 32  # a student's validation batch: larger ones run slower on a CPU (cache)
METRIC = "best_val_accuracy"  # what Tune optimises and ASHA compares: the trial's best epoch so far
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
    spec = ModelSpec(
        kind="student",
        num_classes=len(job.class_names),
        image_size=job.image_size,
        class_names=job.class_names,
        widths=widths,
        dataset=job.dataset,
    )
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


def _kd_trial(config: dict[str, Any], job: StudentJob, role: str = "trial") -> None:
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


def _settle_trial_runs(
    tracker: Tracker,
    grid: Any,
    epochs: int,
    parent_run_id: str | None,
    role: str,
    trainable: str,
) -> None:
    """Give every trial's MLflow run the status of its Tune outcome.

    Tune's final result is the truth: the scheduler may have stopped a trial mid-report (run
    still RUNNING), and an attempt that failed before a successful retry or resume left FAILED.
    A trial the driver started just before it died, and Tune had not yet saved in its
    experiment state, is unknown to the restored search (which runs another in its place): its
    run, still RUNNING and of no trial in the results, is closed and deleted
    (:meth:`Tracker.discard_lost`).
    """
    # A trial's folder is named <trainable>_<trial id>_<n>_<params>: its id, even if it never
    # reported (metrics empty).
    known = {
        Path(result.path).name.removeprefix(f"{trainable}_").split("_")[0]
        for result in grid
        if result.path
    }
    for result in grid:
        run_id = (result.metrics or {}).get("mlflow_run_id")
        if not run_id:
            continue
        epochs_run = int(result.metrics.get("epoch", -1)) + 1
        tracker.set_tags(
            run_id,
            {
                "kdray.epochs_run": epochs_run,
                "kdray.stopped_early": str(epochs_run < epochs).lower(),
            },
        )
        status = "FAILED" if result.error else "FINISHED"
        if tracker.client.get_run(run_id).info.status != status:
            tracker.end_run(run_id, status, error=result.error)
    lost = tracker.discard_lost(parent_run_id, role, known) if parent_run_id else []
    for run_id in lost:
        log.warning(
            "%s run %s: a trial the restored Tune experiment does not know (the driver stopped "
            "before Tune saved it); closed as KILLED and deleted",
            role,
            run_id,
        )


def _prune_checkpoints(grid: Any) -> None:
    """Delete every trial checkpoint but the latest (the one holding the trial's best model).

    The sweep keeps all of them while it runs (``num_to_keep=None``): Tune deletes an older
    checkpoint as soon as a newer one registers but saves its experiment state a moment later,
    so a driver killed in between left a state pointing at a deleted checkpoint, and the
    restored trial failed for good. Once ``fit`` returned, the saved state is final.
    """
    for result in grid:
        if result.checkpoint is None:
            continue
        for checkpoint, _ in result.best_checkpoints or []:
            if checkpoint.path != result.checkpoint.path:
                with contextlib.suppress(FileNotFoundError):  # pruned by an earlier run
                    checkpoint.filesystem.delete_dir(checkpoint.path)


def search_space(cfg: ExperimentConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Tune's param space and its first point (``kd`` and ``student`` settings, always tried)."""
    t, s = cfg.tune, cfg.student
    space: dict[str, Any] = {
        "alpha": tune.uniform(*t.alpha),
        "temperature": tune.uniform(*t.temperature),
        "lr": tune.loguniform(*t.lr),
    }
    first: dict[str, Any] = {
        "alpha": min(max(cfg.kd.alpha, t.alpha[0]), t.alpha[1]),
        "temperature": min(max(cfg.kd.temperature, t.temperature[0]), t.temperature[1]),
        "lr": min(max(s.lr, t.lr[0]), t.lr[1]),
    }
    if s.widths is None:
        # The configured student is always among the choices, so the first point is valid.
        # Every block halves the image: depths that would pool it below 1x1 are left out.
        deepest = max_student_depth(cfg.data.image_size)
        for key, default in (
            ("base_width", s.base_width),
            ("growth", s.growth),
            ("depth", s.depth),
        ):
            choices = {*getattr(t, key), default}
            if key == "depth":
                choices = {d for d in choices if d <= deepest} | {default}
            space[key] = tune.choice(sorted(choices))
            first[key] = default
    return space, first


def seed_point(cfg: ExperimentConfig) -> dict[str, Any]:
    """The KD search's first point as a trial runs it: alpha, temperature, lr, widths."""
    _, first = search_space(cfg)
    widths, lr = trial_hyperparameters(first, cfg)
    return {
        "alpha": first["alpha"],
        "temperature": first["temperature"],
        "lr": lr,
        "widths": widths,
    }


def baseline_search_space(
    cfg: ExperimentConfig,
    widths: list[int],
    temperature: float,
    lr: float,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The CE-only baseline's search: what it can tune (lr, over the KD search's range), with the
    champion's widths and alpha = 1 fixed. Its first point is the champion's own lr."""
    t = cfg.tune
    space = {
        "alpha": 1.0,
        "temperature": temperature,
        "widths": "-".join(map(str, widths)),
        "lr": tune.loguniform(*t.lr),
    }
    return space, {"lr": min(max(lr, t.lr[0]), t.lr[1])}


def sampler_seed(seed: int, dataset: str) -> int:
    """The search's seed for one dataset: reproducible, and different per dataset.

    One seed for all datasets made the three sweeps try the same alpha, T, widths and lr in the
    same order; this derives a seed from ``tune.seed`` and the dataset id (not Python's salted
    ``hash``, so it is the same in every process and run).
    """
    return int(hashlib.sha256(f"{seed}:{dataset}".encode()).hexdigest()[:8], 16)


def _search_alg(cfg: ExperimentConfig, first: dict[str, Any], dataset: str) -> Any:
    seed = sampler_seed(cfg.tune.seed, dataset)
    if cfg.tune.search == "optuna":
        from optuna.samplers import TPESampler
        from ray.tune.search.optuna import OptunaSearch

        # TPE models two objectives as well as one (Optuna's multi-objective TPE).
        sampler = TPESampler(seed=seed, n_startup_trials=cfg.tune.startup_trials)
        if two_objectives(cfg):
            return OptunaSearch(
                metric=[METRIC, TRANSPARENCY],
                mode=["max", "max"],
                sampler=sampler,
                points_to_evaluate=[first],
            )
        return OptunaSearch(metric=METRIC, mode="max", sampler=sampler, points_to_evaluate=[first])
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=seed, points_to_evaluate=[first])


def _scheduler(cfg: ExperimentConfig) -> Any:
    if cfg.tune.scheduler == "none":
        return None
    epochs = cfg.student.epochs
    grace = min(cfg.tune.grace_period, epochs)
    if two_objectives(cfg):
        return ParetoASHA(
            [METRIC, TRANSPARENCY],
            max_t=epochs,
            grace_period=grace,
            reduction_factor=cfg.tune.reduction_factor,
        )
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        metric=METRIC,
        mode="max",
        max_t=epochs,
        grace_period=grace,
        reduction_factor=cfg.tune.reduction_factor,
    )


def make_job(
    cfg: ExperimentConfig,
    data: PreparedData,
    teacher: TeacherResult,
    tracker: Tracker | None,
    parent_run_id: str | None,
) -> StudentJob:
    """The students' job: they train on ``cfg.data.student_fraction`` of the training split (the
    teacher's cached logits cut to the same rows)."""
    cached = cfg.kd.teacher_logits == "cache"
    fraction, seed = cfg.data.student_fraction(data.spec.id), cfg.data.split_seed
    rows = data.student_indices(fraction, seed)
    students = data.for_students(fraction, seed)
    scoring = scoring_set(cfg, data)
    # The teacher's maps of the scored images, at the layer measured for it (its cam.json): what
    # each KD student's agreement is measured against.
    teacher_model, _ = load_model(teacher.model_dir)
    choice = cam_choice(cfg, teacher_model, teacher.model_dir, scoring)
    maps, _, _ = layer_cams(teacher_model, scoring.images, [choice.layer], choice.method)
    scoring.teacher_maps = maps[choice.layer]
    return StudentJob(
        cfg,
        data.spec.id,
        list(data.spec.classes),
        data.image_size,
        students.splits["train"],
        students.splits["val"],
        teacher_logits=teacher.train_logits()[rows].astype(np.float32) if cached else None,
        teacher_files=None if cached else model_files(teacher.model_dir),
        tracker=tracker,
        parent_run_id=parent_run_id,
        data_inputs=split_inputs(students),
        record=record_for(cfg.data, data, student=True),
        scoring=scoring,
    )


class SweepProgress(tune.Callback):
    """A console line as trials end (each of a small search; about eight for a large one): trials
    done / total, how many the scheduler stopped early, the best validation accuracy so far, ETA
    from the pace so far. Runs in the driver."""

    def __init__(self, dataset: str, label: str, total: int, epochs: int) -> None:
        self.dataset, self.label, self.total, self.epochs = dataset, label, total, epochs
        self.started = time.perf_counter()
        self.ended: dict[str, str] = {}  # trial id -> "done" / "stopped" / "error"

    def setup(self, **info: Any) -> None:
        self.started = time.perf_counter()

    def _line(self, trials: list[Any]) -> None:
        done = len(self.ended)
        # About eight lines a search (24 trials: every third), always the first and the last.
        if done not in (1, self.total) and done % max(1, self.total // 8):
            return
        best = max((t.last_result.get(METRIC, -1.0) for t in trials if t.last_result), default=-1.0)
        stopped = sum(v == "stopped" for v in self.ended.values())
        errors = sum(v == "error" for v in self.ended.values())
        extra = (f", {stopped} stopped early" if stopped else "") + (
            f", {errors} failed" if errors else ""
        )
        log.info(
            "%s: %s %d/%d trials done%s · best val acc %s%s",
            self.dataset,
            self.label,
            len(self.ended),
            self.total,
            extra,
            f"{best:.3f}" if best >= 0 else "n/a",
            eta(time.perf_counter() - self.started, len(self.ended), self.total),
        )

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        epochs_run = int(trial.last_result.get("epoch", -1)) + 1 if trial.last_result else 0
        self.ended[trial.trial_id] = "done" if epochs_run >= self.epochs else "stopped"
        self._line(trials)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.ended[trial.trial_id] = "error"
        self._line(trials)


def _new_tuner(
    cfg: ExperimentConfig,
    trainable: Any,
    space: dict[str, Any],
    first: dict[str, Any],
    ws: Workspace,
    name: str,
    dataset: str,
    progress: SweepProgress,
) -> tune.Tuner:
    t = cfg.tune
    return tune.Tuner(
        trainable,
        param_space=space,
        # The searcher and the scheduler name their own objectives (two of them: no single
        # metric here).
        tune_config=tune.TuneConfig(
            num_samples=t.num_samples,
            max_concurrent_trials=t.max_concurrent_trials,
            search_alg=_search_alg(cfg, first, dataset),
            scheduler=_scheduler(cfg),
            reuse_actors=t.reuse_actors,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=ws.ray_storage(cfg.ray.storage_path),
            # All kept until the sweep ends (see _prune_checkpoints): a restore always finds
            # the checkpoint its saved state names.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
            failure_config=tune.FailureConfig(max_failures=t.max_failures),
            callbacks=[progress],
            verbose=1,  # Tune's tables: in the run's log file (the terminal has kdray's lines)
        ),
    )


_TUNE_REGISTRY_LOCK = threading.Lock()


def _register_trainable(job: StudentJob, role: str) -> str:
    """Register this dataset's trial function with Tune; return its name for the Tuner.

    Tune's registries (``with_parameters``' object-store parameters, the trainable registry) flush
    a shared dict without a lock; two datasets' sweeps starting at once in the driver
    (``ray.max_concurrent_datasets``) made it fail with "dictionary changed size during
    iteration". Registering here, one thread at a time, and handing the Tuner the name leaves
    Tune nothing to register. The name is per dataset and role, the same on a resume.
    """
    t = job.cfg.tune
    name = f"{'kd' if role == 'trial' else 'ce'}_trial_{job.dataset}"
    with _TUNE_REGISTRY_LOCK:
        trainable = tune.with_resources(
            tune.with_parameters(_kd_trial, job=job, role=role),
            {"cpu": t.cpus_per_trial, "gpu": t.gpus_per_trial},
        )
        tune.register_trainable(name, trainable)
    return name


def run_sweep(
    job: StudentJob,
    ws: Workspace,
    name: str,
    restore: bool = False,
    search: tuple[dict[str, Any], dict[str, Any]] | None = None,
    role: str = "trial",
) -> list[TrialOutcome]:
    """Run a Tune search for one dataset; return every trial that finished with a checkpoint.

    The same budget (``tune.num_samples`` trials, sampler, scheduler, resources) serves the KD
    sweep and the CE-only baseline's search.

    Args:
        name: the Tune experiment's name under the Ray storage path.
        restore: continue that experiment (``Tuner.restore``) if it exists: finished trials
            stay, unfinished and errored ones resume from their last checkpoint.
        search: (param space, first point); default the KD search (:func:`search_space`).
        role: the trials' ``kdray.role`` in MLflow (``trial``, ``baseline-trial``).

    Raises:
        RuntimeError: no trial finished.
    """
    cfg, t = job.cfg, job.cfg.tune
    if two_objectives(cfg) and job.scoring is None:
        raise ValueError(
            "tune.champion 'transparent' searches two objectives: the job needs its scoring set "
            "(kdray.explain.scoring.scoring_set)"
        )
    space, first = search or search_space(cfg)
    trainable = _register_trainable(job, role)
    path = f"{ws.ray_storage(cfg.ray.storage_path).rstrip('/')}/{name}"
    label = "KD sweep" if role == "trial" else "CE baseline search"
    progress = SweepProgress(job.dataset, label, t.num_samples, cfg.student.epochs)
    if restore and tune.Tuner.can_restore(path):
        log.info("%s: restoring the Tune experiment %s", job.dataset, path)
        tuner = tune.Tuner.restore(
            path,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=True,
            param_space=space,
        )
    else:
        if role == "trial":  # the baseline's search is announced by crown_champion
            log.info(
                "%s: KD sweep: %d trials, %d at a time, up to %d epochs each (scheduler %s)",
                job.dataset,
                t.num_samples,
                t.max_concurrent_trials,
                cfg.student.epochs,
                t.scheduler,
            )
        tuner = _new_tuner(cfg, trainable, space, first, ws, name, job.dataset, progress)
    grid = tuner.fit()
    _settle_trial_runs(job.tracker, grid, cfg.student.epochs, job.parent_run_id, role, trainable)
    _prune_checkpoints(grid)
    outcomes = []
    for result in grid:
        if result.error is None and result.metrics and result.checkpoint is not None:
            widths, lr = trial_hyperparameters(result.config, cfg)
            m = result.metrics
            outcomes.append(
                TrialOutcome(
                    m["mlflow_run_id"],
                    dict(result.config),
                    widths,
                    lr,
                    float(m["best_val_accuracy"]),
                    int(m["params"]),
                    int(m["flops"]),
                    result.checkpoint,
                    epochs_run=int(m.get("epoch", -1)) + 1,
                    transparency=float(m.get(TRANSPARENCY, float("nan"))),
                    transparency_parts={
                        k: float(v)
                        for k, v in m.items()
                        if k.startswith(f"{TRANSPARENCY}.") and isinstance(v, int | float)
                    },
                )
            )
    if not outcomes:
        raise RuntimeError(f"no trial of {name} finished; see the Ray Tune errors above")
    return outcomes
