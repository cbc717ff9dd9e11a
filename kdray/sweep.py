"""KD sweep: Ray Tune searches alpha, temperature, student width/depth and lr; one MLflow run each.

What each trial runs (one student's training, its MLflow run, its reports) is
:mod:`kdray.trial`; this module is the Tune plumbing around it: the search space, the searcher
and scheduler, the students' job, the Tuner and its restore, and settling the trials' runs and
checkpoints once the search ends. :mod:`kdray.champion` picks and scores the winner.

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
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from ray import tune

from kdray.config import ExperimentConfig, max_student_depth
from kdray.console import eta
from kdray.data.mlflow_inputs import split_inputs
from kdray.data.prepare import PreparedData
from kdray.data.record import record_for
from kdray.explain.gradcam import layer_cams
from kdray.explain.scoring import cam_choice, scoring_set
from kdray.models import load_model, model_files
from kdray.pareto import ParetoASHA
from kdray.tracking import Tracker
from kdray.trial import (
    TRANSPARENCY,
    StudentJob,
    TrialOutcome,
    kd_trial,
    trial_hyperparameters,
    two_objectives,
)
from kdray.workspace import Workspace

if TYPE_CHECKING:  # a trial's process needs no teacher code (torchvision's augmentations)
    from kdray.teacher import TeacherResult

__all__ = [
    "baseline_search_space",
    "make_job",
    "run_sweep",
    "sampler_seed",
    "search_space",
    "seed_point",
]

log = logging.getLogger("kdray")
METRIC = "best_val_accuracy"  # what Tune optimises and ASHA compares: the trial's best epoch so far


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
            tune.with_parameters(kd_trial, job=job, role=role),
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
