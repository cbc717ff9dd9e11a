"""KD sweep throughput: what a Ray Tune KD trial costs against the same training in a plain loop.

Measured side by side in one run, on the default config's student data (synthetic, 64 px, the
students' 25 % share of the training split, cached teacher logits), one torch thread per trial:

- plain loop: :func:`kdray.trial.train_student` in a bare process, no Ray, no MLflow, no
  checkpoints: the epochs, the KD loss, Adam and the validation pass a trial computes; as many
  processes at once as the sweep runs trials (the headline ratio: on these 2 cores two loops
  side by side each took 1.05-1.2x one alone), and once alone.
- Tune trial: the product's :func:`kdray.sweep.run_sweep` on a private local Ray with
  ``--cpus`` CPUs, every trial logging to MLflow (SQLite) and reporting to Tune, scheduler off so
  that every trial runs all its epochs. Its cost per trial is the sweep's wall time times the
  trials running at once, divided by the trials: start-up of actors, data, MLflow, checkpoints
  and Tune's controller all count.

Held equal between the plain loop and a Tune trial: the training code
(:func:`kdray.trial.train_student`: channels-last student and batches, KD loss, Adam, validation
at batch ``VAL_BATCH``), the student data and cached logits (one ``student_job``), the widths
(every trial gets the seed point's), the epochs (no early stopping), the torch threads (both set
by :func:`kdray.devices.use_assigned_threads`: the trial's CPUs, 1), how many run at once
(``--cpus``), and when (the plain loops run before and after the sweeps, their times pooled).
Not held equal, on purpose: a trial's alpha, temperature and lr are the search's draws (they do
not change what an epoch computes), and only the trial pays Ray, Tune, MLflow and checkpoints,
and a fresh actor's first kernels (the plain processes warm up once, untimed).

Transparency scoring (:mod:`kdray.explain.scoring`): the same sweep twice more, the same trials
(scheduler off, the seed point's widths, the same seeds), once with every trial scoring its best
model where the product's default scheduler would have it score (after the rung at
``tune.grace_period`` and after the last epoch, ``kdray.trial.score_epochs``), on the default
``transparency.images`` validation images, with lesion masks, and the teacher's maps for the
agreement; once without. Held equal: everything but the scoring; the two sweeps alternate
(none, scoring, none, scoring; the first is the headline sweep above) and their times are pooled.

Prints ``Tune KD trial / plain loop, same epochs: <ratio>`` (goal <= 1.5),
``KD trials per minute, <n> cores: <n>``, the ratio to the plain loop alone, and
``transparency scoring / none, same trials: <ratio>`` (goal <= 1.15) with the seconds one
scoring takes. With ``--variants`` it also runs the sweep once per setting that changes a trial's
overhead (before / after of each), in the same run.

    .venv/bin/python benchmarks/sweep_throughput.py [--trials 24] [--epochs 12] [--variants]

``--quick`` (2 trials of 2 epochs on 8 images per class at 32 px; one scored sweep) runs the same
code to check that it works; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from kdray.config import ExperimentConfig
from kdray.data.prepare import in_memory_synthetic
from kdray.devices import use_assigned_threads
from kdray.explain.scoring import ScoringSet
from kdray.session import ray_session
from kdray.sweep import run_sweep
from kdray.tracking import Tracker
from kdray.trial import StudentJob, score_epochs, train_student
from kdray.workspace import Workspace

QUICK = {"images_per_class": 8, "size": 32, "trials": 2, "epochs": 2, "plain_repeats": 1}

WIDTHS = [16, 32, 64, 128, 128]  # the default student (base 16, growth 2, depth 5)

# Settings that change what a trial pays besides its training (config overrides of ``tune``).
VARIANTS = {
    "fresh actor per trial": {"reuse_actors": False},
    "reused actors": {"reuse_actors": True},
}


def student_job(
    args: argparse.Namespace, cfg: ExperimentConfig, tracker: Tracker | None, scored: bool = False
):
    """The default run's student data: a quarter of the training split, cached teacher logits;
    with ``scored``, the validation images every trial is scored on (and teacher maps), scored
    at the epochs the default scheduler would score at."""
    data = in_memory_synthetic(
        "brain_tumor", args.images_per_class, args.size, val_fraction=0.15, test_fraction=0.15
    )
    students = data.for_students(0.25, 0)
    train = students.splits["train"]
    rng = np.random.default_rng(0)  # the cost of KD does not depend on the teacher's values
    logits = rng.normal(size=(len(train), len(data.spec.classes))).astype(np.float32)
    scoring = None
    if scored:
        scoring = ScoringSet.from_split(data.splits["val"], cfg.transparency.images, cfg.seed)
        # The agreement costs the same for any teacher map: random ones of the right shape.
        scoring.teacher_maps = rng.random(scoring.images.shape[:1] + (args.size, args.size))
    default_scheduler = cfg.model_copy(
        update={
            "tune": cfg.tune.model_copy(update={"scheduler": "asha", "champion": "transparent"})
        }
    )
    return StudentJob(
        cfg,
        data.spec.id,
        list(data.spec.classes),
        args.size,
        train,
        students.splits["val"],
        teacher_logits=logits,
        tracker=tracker,
        scoring=scoring,
        score_at=frozenset(score_epochs(default_scheduler)) if scored else None,
    )


def config(args: argparse.Namespace, tune_overrides: dict) -> ExperimentConfig:
    return ExperimentConfig.model_validate(
        {
            "data": {"image_size": args.size},
            # The seed point's widths for every trial: each computes what the plain loop does.
            "student": {"epochs": args.epochs, "widths": WIDTHS},
            "tune": {
                "num_samples": args.trials,
                "max_concurrent_trials": args.cpus,
                "cpus_per_trial": 1,
                "scheduler": "none",
                # One objective unless a variant scores (transparency is then the second).
                "champion": "accuracy",
                **tune_overrides,
            },
        }
    )


def _plain_once(args: argparse.Namespace) -> float:
    cfg = config(args, {})
    # What a trial does first (kdray.trial.kd_trial): outside Ray, the same cpus_per_trial.
    use_assigned_threads(default=max(1, int(cfg.tune.cpus_per_trial)))
    job = student_job(args, cfg, None)
    started = time.perf_counter()
    train_student(job, cfg.kd.alpha, cfg.kd.temperature, WIDTHS)
    return time.perf_counter() - started


def _warm(args: argparse.Namespace) -> None:
    """Imports and oneDNN's first kernels, before anything is timed."""
    cfg = config(args, {})
    use_assigned_threads(default=max(1, int(cfg.tune.cpus_per_trial)))
    train_student(student_job(args, cfg, None), cfg.kd.alpha, cfg.kd.temperature, WIDTHS[:1])


def plain_seconds(args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """Wall times of the seed point's training, one thread each, in bare processes: one alone,
    then ``--cpus`` side by side (as many as the sweep runs trials at once: they share caches and
    memory bandwidth as the trials do)."""
    alone, at_once = [], []
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.cpus, mp_context=context) as pool:
        list(pool.map(_warm, [args] * args.cpus))
        for _ in range(args.plain_repeats):
            alone.append(pool.submit(_plain_once, args).result())
            at_once += pool.map(_plain_once, [args] * args.cpus)
    return alone, at_once


def breakdown(tracker: Tracker, slot_seconds: float) -> dict[str, float]:
    """Where a trial's slot goes, in seconds per trial, read from its MLflow run's timestamps.

    training: the epochs' own time (``epoch_seconds``); between epochs: validation, the
    checkpoint and the report to Tune, MLflow's logging; run set-up: from the run's creation to
    the first epoch (parameters, config, dataset inputs, model and loader); outside the run:
    actor start, Tune's scheduling and the run's closing.
    """
    client = tracker.client
    parts: dict[str, list[float]] = {"training": [], "between epochs": [], "run set-up": []}
    for run in client.search_runs([tracker.experiment_id]):
        history = sorted(
            client.get_metric_history(run.info.run_id, "epoch_seconds"), key=lambda m: m.step
        )
        stamps = [m.timestamp / 1000 for m in history]
        epoch = [m.value for m in history]
        parts["training"].append(sum(epoch))
        gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
        parts["between epochs"].append(sum(gaps) - sum(epoch[1:]))
        parts["run set-up"].append(stamps[0] - epoch[0] - run.info.start_time / 1000)
    out = {k: statistics.mean(v) for k, v in parts.items()}
    out["outside the run"] = slot_seconds - sum(out.values())
    return out


def val_curves(tracker: Tracker) -> list[list[float]]:
    """Every trial's val accuracy per epoch, trials in the order they started."""
    client = tracker.client
    runs = client.search_runs([tracker.experiment_id], order_by=["attributes.start_time ASC"])
    curves = []
    for run in runs:
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        curves.append([m.value for m in sorted(history, key=lambda m: m.step)])
    return curves


def asha_stops(curves: list[list[float]], grace: int, rf: float) -> list[bool]:
    """Would Ray's ASHA (max_t = the epochs) have stopped each trial, the trials arriving in
    order? At each rung (grace, grace * rf, ...) a trial's best val accuracy so far must reach
    the (1 - 1/rf) quantile of what earlier trials recorded there (ray.tune.schedulers.ASHA)."""
    epochs = len(curves[0])
    rungs, t = [], grace
    while t < epochs:
        rungs.append(int(t))
        t *= rf
    recorded: dict[int, list[float]] = {r: [] for r in rungs}
    stopped = []
    for curve in curves:
        stop = False
        for rung in rungs:
            value = max(curve[:rung])
            seen = recorded[rung]
            cutoff = np.nanpercentile(seen, (1 - 1 / rf) * 100) if seen else -np.inf
            seen.append(value)
            if value < cutoff:
                stop = True
                break
        stopped.append(stop)
    return stopped


def rung_check(curves: list[list[float]], top: int = 5) -> list[str]:
    """For each ASHA setting: how many of the trials that end in the top ``top`` (all epochs
    run) it would have stopped early, and whether it keeps the best one."""
    finals = [max(c) for c in curves]
    order = sorted(range(len(curves)), key=lambda i: -finals[i])
    best, tops = order[0], set(order[:top])
    lines = []
    for grace, rf in ((2, 2), (3, 2), (3, 3), (4, 2), (4, 3), (6, 2)):
        stops = asha_stops(curves, grace, rf)
        lost = sum(stops[i] for i in tops)
        lines.append(
            f"  ASHA grace {grace}, reduction {rf}: stops {sum(stops)}/{len(curves)} trials, "
            f"{lost}/{len(tops)} of the final top {len(tops)}, "
            f"{'stops' if stops[best] else 'keeps'} the best"
        )
    return lines


def sweep_seconds(
    args: argparse.Namespace, overrides: dict, root: Path, name: str, scored: bool = False
) -> tuple[float, dict[str, float], list[list[float]]]:
    """Wall time of one product sweep (all trials), MLflow and checkpoints included, and where
    a trial's slot went."""
    cfg = config(args, {**overrides, **({"champion": "transparent"} if scored else {})})
    ws = Workspace(root / name)
    tracker = Tracker.open(cfg.mlflow, ws)
    job = student_job(args, cfg, tracker, scored)
    started = time.perf_counter()
    outcomes = run_sweep(job, ws, name=name)
    seconds = time.perf_counter() - started
    if len(outcomes) != args.trials:
        raise RuntimeError(f"{name}: {len(outcomes)} of {args.trials} trials finished")
    return seconds, breakdown(tracker, seconds * args.cpus / args.trials), val_curves(tracker)


def scoring_time(root: Path) -> float:
    """The median seconds one transparency scoring took in the scored sweeps' trials (their
    MLflow metric ``transparency_seconds``)."""
    seconds = []
    for ws in sorted(root.glob("scoring*")):
        tracker = Tracker.open(ExperimentConfig().mlflow, Workspace(ws))
        for run in tracker.client.search_runs([tracker.experiment_id]):
            history = tracker.client.get_metric_history(run.info.run_id, "transparency_seconds")
            seconds += [m.value for m in history]
    return statistics.median(seconds) if seconds else float("nan")


def default_label(runs: dict[str, dict]) -> str:
    """The run whose settings are the product's defaults (the headline sweep)."""
    defaults = ExperimentConfig().tune
    return next(
        label
        for label, overrides in runs.items()
        if all(getattr(defaults, k) == v for k, v in overrides.items())
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-per-class", type=int, default=300)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--cpus", type=int, default=2, help="Ray CPUs = trials at once")
    parser.add_argument("--plain-repeats", type=int, default=2)
    parser.add_argument("--variants", action="store_true", help="before/after of each setting")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script")
    args = parser.parse_args()
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    alone, at_once = plain_seconds(args)  # before the sweeps, and again after them
    runs = VARIANTS if args.variants else {"product default": {}}
    with tempfile.TemporaryDirectory(prefix="kdray-sweep-bench-") as tmp:
        root = Path(tmp)
        ray_cfg = ExperimentConfig.model_validate(
            {"ray": {"num_cpus": args.cpus, "temp_dir": str(root / "ray")}}
        ).ray
        with ray_session(ray_cfg, Workspace(root / "ray-ws")):
            walls = {
                label: sweep_seconds(args, overrides, root, f"sweep{i}")
                for i, (label, overrides) in enumerate(runs.items())
            }
            default = default_label(runs)
            # Transparency scoring against none, the same trials, alternating: the product
            # default's sweep above is the first unscored one (none, scored[, none, scored]).
            scoring: dict[bool, list[float]] = {True: [], False: [walls[default][0]]}
            order = (True,) if args.quick else (True, False, True)
            for i, scored in enumerate(order):
                wall, _, _ = sweep_seconds(args, {}, root, f"scoring{i}", scored)
                scoring[scored].append(wall)
            scoring_seconds = scoring_time(root)
    after = ([], []) if args.quick else plain_seconds(args)  # quick: before the sweeps only
    alone = statistics.median(alone + after[0])
    plain = statistics.median(at_once + after[1])
    print(
        f"{args.trials} KD trials x {args.epochs} epochs, {args.images_per_class} images per class "
        f"at {args.size} px, {args.cpus} at a time, 1 thread each"
    )
    print(f"  plain loop, one trial's training alone: {alone:7.2f} s")
    print(f"  plain loop, {args.cpus} at once (as the trials run): {plain:7.2f} s each")
    for label, (wall, parts, _) in walls.items():
        per_trial = wall * args.cpus / args.trials
        print(
            f"  {label:24} sweep {wall:7.1f} s, {per_trial:6.2f} s per trial slot, "
            f"ratio {per_trial / plain:.2f}"
        )
        print("    " + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items()))
    wall, _, curves = walls[default]
    print(f"headline: {default} (the product's default)")
    slot = wall * args.cpus / args.trials
    print(f"Tune KD trial / plain loop, same epochs: {slot / plain:.2f}")
    print(f"Tune KD trial / plain loop alone on the machine: {slot / alone:.2f}")
    print(f"KD trials per minute, {args.cpus} cores: {args.trials / wall * 60:.1f}")
    print(f"Early stopping on these {len(curves)} trials (each ran all {args.epochs} epochs):")
    print("\n".join(rung_check(curves)))
    with_scoring, without = statistics.mean(scoring[True]), statistics.mean(scoring[False])
    print(
        f"transparency scoring / none, same trials: {with_scoring / without:.2f} "
        f"(sweeps {with_scoring:.1f} s against {without:.1f} s; one scoring "
        f"{scoring_seconds:.2f} s median, at epochs {sorted(e + 1 for e in student_job(args, config(args, {}), None, True).score_at)})"
    )


if __name__ == "__main__":
    main()
