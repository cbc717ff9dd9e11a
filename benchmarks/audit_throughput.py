"""How fast is the dataset audit (``tune/audit.py``)? Ray Data's actor pool against a plain loop.

Side by side in one run, on the same files: ``--images`` synthetic brain-tumour MRI slices in
the Kaggle layout (written once, at ``--file-size`` px, read at ``--size``), a student of the
default search's widest shape and the DenseNet121 teacher (random weights: the speed does not
depend on them), methods feature maps + Grad-CAM:

* plain loop: one fresh process, one thread, :func:`kdray.audit.scorer.score_batch` over the
  files in batches: the same decode, forward, feature maps and Grad-CAM an actor runs;
* Ray Data (:func:`kdray.audit.run.run_audit`, no MLflow), 1 actor x 1 CPU and 2 actors x 1 CPU,
  student + teacher; then 2 actors student only; then SHAP (``--shap-images`` sampled, 2 actors).

Held equal between the plain loop and the actors: the files, the models (loaded from the same
bytes by :func:`kdray.audit.scorer.load_audit_model`), the settings (methods, explain config,
seed: one ``ExperimentConfig``), the batches (``--batch-size`` consecutive rows), the threads
(:func:`kdray.audit.scorer.limit_threads` (1): torch, OpenCV and the BLAS pools), and the warm-up:
none on either side (the loop runs in a fresh process, as each actor does, its first batch timed
cold like theirs). The order of a round's three runs reverses every other round. Not held
equal, on purpose: only the Ray Data figures pay Ray (actor start-up in the whole call,
scheduling, the driver's collection of the rows).

Each Ray Data figure is the whole call, actor start-up included (what a user waits for), and the
steady state: rows / time from the first batch's start to the last batch's end, both as the
actors recorded them (the actors were up). The plain loop's figure is its steady state: rows /
time from its first batch's start to its last batch's end, model loading excluded. Ray Data's
stats of the last run are printed at the end. Run ``python benchmarks/audit_throughput.py``
(about 6 minutes on 2 cores: two rounds, each ratio taken within a round, medians printed) or
``--quick`` (the same code on 32 images at 32 px, one round: under a minute) to
check that it works; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

GOAL_RAY_PLAIN = 0.8
GOAL_TWO_ONE = 1.6
QUICK = {
    "images": 32,
    "size": 32,
    "file_size": 48,
    "batch_size": 8,
    "rounds": 1,
    "shap_images": 2,
    "shap_nsamples": 4,
    "extra_actors": 1,
}


def build(tmp: Path, args: argparse.Namespace):
    """The files, the models (as the audit ships them) and the listing."""
    import torch

    from kdray.audit.sources import folder_source
    from kdray.data import synthetic
    from kdray.data.specs import get_spec
    from kdray.models import ModelSpec, build_model, model_files, save_model

    spec = get_spec("brain_tumor")
    per_class = max(2, math.ceil(args.images / 4))
    synthetic.generate("brain_tumor", tmp / "images", tmp / "masks", per_class, args.file_size, 0)
    source = folder_source(spec, tmp / "images", tmp / "masks")
    source.items = source.items[: args.images]
    torch.manual_seed(0)
    classes = list(spec.classes)
    models = {}
    for role, spec_ in (
        ("student", ModelSpec("student", 4, args.size, classes, widths=[16, 32, 64, 128, 128])),
        ("teacher", ModelSpec("teacher", 4, args.size, classes)),
    ):
        folder = save_model(build_model(spec_).eval(), spec_, tmp / role)
        rng = np.random.default_rng(0)
        background = rng.integers(0, 256, (16, 3, args.size, args.size), dtype=np.uint8)
        models[role] = (model_files(folder), background)
    return source, models, classes


def experiment_config(args: argparse.Namespace):
    """The one config both sides score with (explain layers, top-k, SHAP samples, seed)."""
    from kdray.config import ExperimentConfig

    return ExperimentConfig(explain={"shap_nsamples": args.shap_nsamples})


def _plain_scores(source, models, args) -> float:
    """In a fresh process: what an actor does (threads, models, settings), then every batch."""
    from kdray.audit.scorer import (
        CHEAP_METHODS,
        Settings,
        limit_threads,
        load_audit_model,
        score_batch,
    )

    limit_threads(1)  # what each actor does: one CPU, every thread pool included
    cfg = experiment_config(args)
    loaded = [load_audit_model(r, f, b, cfg.explain) for r, (f, b) in models.items()]
    rows = source.rows()
    settings = Settings(methods=CHEAP_METHODS, explain=cfg.explain, seed=cfg.seed, threads=1)
    # No warm-up: an actor's first batch is timed cold too (its steady state starts there).
    t0 = time.perf_counter()
    for i in range(0, len(rows), args.batch_size):
        part = rows[i : i + args.batch_size]
        score_batch(loaded, {k: np.array([r[k] for r in part]) for k in part[0]}, settings)
    return len(rows) / (time.perf_counter() - t0)


def plain_loop(source, models, args) -> float:
    """images/s of score_batch over the files in a fresh process (as an actor is), one thread."""
    import copy

    src = copy.deepcopy(source)
    for item in src.items:  # as the Ray runs of the cheap methods get it
        item.shap = False
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_plain_scores, src, models, args).result()


def ray_audit(source, models, classes, args, tmp, actors, roles, methods, shap=0):
    """(whole images/s, steady images/s, stats) of run_audit on this listing."""
    import copy

    from kdray.audit.run import AuditRequest, Prepared, run_audit
    from kdray.workspace import Workspace

    cfg = experiment_config(args)
    src = copy.deepcopy(source)
    for item in src.items:
        item.shap = False
    if shap:
        from kdray.audit.sources import mark_shap

        mark_shap(src, shap, 0)
        src.items = [it for it in src.items if it.shap]
        for i, it in enumerate(src.items):
            it.index = i
    chosen = {r: models[r] for r in roles}
    prepared = Prepared(src, chosen, {r: f"benchmark/{r}" for r in roles}, classes, args.size, shap)
    req = AuditRequest(
        dataset="brain_tumor",
        methods=tuple(methods),
        teacher="teacher" in roles,
        actors=actors,
        batch_size=args.batch_size,
        out=str(tmp / f"out-{actors}-{'-'.join(roles)}-{shap}"),
        log_mlflow=False,
    )
    t0 = time.perf_counter()
    result = run_audit(cfg, Workspace(tmp / "ws"), req, prepared=prepared, progress=lambda _: None)
    whole = len(src.items) / (time.perf_counter() - t0)
    # Steady state: from the first batch's start to the last batch's end (the actors were up).
    table = pq.read_table(result.table, columns=["scored_at", "batch_seconds"]).to_pandas()
    window = table["scored_at"].max() - (table["scored_at"] - table["batch_seconds"]).min()
    steady = len(table) / window
    return whole, steady, result.stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="files audited")
    parser.add_argument("--size", type=int, default=64, help="model input side (the default run's)")
    parser.add_argument("--file-size", type=int, default=96, help="side of the files written")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of plain, 1 and 2 actors")
    parser.add_argument("--shap-images", type=int, default=24, help="images SHAP explains")
    parser.add_argument("--shap-nsamples", type=int, default=50, help="SHAP samples per image")
    parser.add_argument(
        "--extra-actors", type=int, default=2, help="actors of the student-only and SHAP runs"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="32 images at 32 px, one round, 1 actor for the student-only and SHAP runs, SHAP "
        "on 2 at 4 samples",
    )
    args = parser.parse_args()
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_worker_niceness", "0")  # as kdray's own local Ray (pipeline.py)
    import ray

    tmp = Path(tempfile.mkdtemp(prefix="kdray-audit-bench-"))
    try:
        source, models, classes = build(tmp, args)
        n = len(source.items)
        print(f"{n} files, {args.size}x{args.size} input, batches of {args.batch_size}")
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            _temp_dir=str(tmp / "ray"),
        )
        both, cheap = ("student", "teacher"), ("feature_maps", "gradcam")
        # Side by side, round after round (the machine is shared: a ratio is taken within a round).
        per_round = []
        for r in range(args.rounds):
            runs = {
                "plain": lambda: plain_loop(source, models, args),
                "one": lambda: ray_audit(source, models, classes, args, tmp, 1, both, cheap),
                "two": lambda: ray_audit(source, models, classes, args, tmp, 2, both, cheap),
            }
            # Every other round in reverse: the plain loop is not always the first of the three.
            got = {k: runs[k]() for k in (list(runs) if r % 2 == 0 else list(reversed(runs)))}
            plain, one, two = got["plain"], got["one"], got["two"]
            per_round.append((plain, one, two))
            print(
                f"round {r + 1}: plain loop {plain:.1f} images/s; Ray Data 1 actor {one[0]:.1f} "
                f"whole call ({one[1]:.1f} steady), 2 actors {two[0]:.1f} ({two[1]:.1f})",
                flush=True,
            )
        extra = args.extra_actors
        student = ray_audit(source, models, classes, args, tmp, extra, ("student",), cheap)
        shap = ray_audit(
            source, models, classes, args, tmp, extra, both, ("shap",), args.shap_images
        )
        ray.shutdown()
        med = statistics.median
        ratio_whole = med(one[0] / plain for plain, one, _ in per_round)
        ratio_steady = med(one[1] / plain for plain, one, _ in per_round)
        two_one_whole = med(two[0] / one[0] for _, one, two in per_round)
        two_one_steady = med(two[1] / one[1] for _, one, two in per_round)
        print()
        print(
            f"audit Ray Data / plain loop, images/s: {ratio_whole:.2f} "
            f"(steady state {ratio_steady:.2f})"
        )
        print(f"audit 2 actors / 1 actor: {two_one_whole:.2f} (steady state {two_one_steady:.2f})")
        print(
            f"student only, {extra} actor(s): {student[0]:.1f} images/s ({student[1]:.1f} steady)"
        )
        two = per_round[-1][2]
        print(f"student + teacher, 2 actors: {two[0]:.1f} images/s ({two[1]:.1f} steady)")
        print(
            f"SHAP ({args.shap_nsamples} samples), student + teacher, {extra} actor(s): "
            f"{shap[0]:.2f} images/s on {args.shap_images} sampled ({shap[1]:.2f} steady)"
        )
        for goal, got in (
            (f"Ray Data / plain loop >= {GOAL_RAY_PLAIN}", ratio_whole),
            (f"2 actors / 1 actor >= {GOAL_TWO_ONE}", two_one_whole),
        ):
            print(f"{'met ' if got >= float(goal.split()[-1]) else 'MISS'}  {goal}: {got:.2f}")
        print("\nRay Data stats, 2 actors, student + teacher, last round:\n" + two[2])
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
