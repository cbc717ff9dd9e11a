"""Teacher training through Ray Train's TorchTrainer vs the same work in a plain PyTorch loop.

What a user pays, measured side by side in one run. Held equal on both sides: the data, the
model, its memory format (channels-last), the precision (``teacher.amp``: bf16 on a CPU with AMX,
else fp32), the augmentation and its output layout, the batch, the optimiser and LR schedule, the
threads (``kdray.teacher_worker.step_setup`` decides all of these for both), the validation pass
and the checkpoint's content. Only Ray Train's part differs (worker process, DDP wrapper, MLflow
logging from rank 0, checkpoint registration and ``ray.train.report``).

- Ray Train, whole epoch: the wall time between two successive epoch reports of the product's
  ``fit_teacher`` (training, rank-0 validation, MLflow logging, checkpoint save and
  ``ray.train.report``), read from the MLflow timestamps of each epoch's metrics; the first
  epoch is excluded (warm-up).
- plain, whole epoch: the same training, validation, LR schedule step and checkpoint save
  (``torch.save`` of the same state) in a loop in this process, first epoch excluded.
- Ray Train fixed start-up: ``fit()``'s wall time minus its epochs (worker group start, data
  through the object store, shutdown).

Prints ``Ray Train / plain, whole epoch: <ratio>`` (goal <= 1.15 at 1 worker) and
``Ray Train fixed start-up: <seconds> s``, then where the epoch's extra time goes.

    .venv/bin/python benchmarks/train_overhead.py [--images-per-class 96] [--size 64] [--epochs 4]

Unless ``$RAY_ADDRESS`` names a cluster to join, the script starts its own local Ray, in a
temporary directory of its own. ``--quick`` (8 images per class at 32 px, 3 epochs per side: Ray's
start-up is most of its time) runs the same code to check that it works; its figures mean
nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from mlflow import MlflowClient

from kdray.config import ExperimentConfig, MLflowConfig, RayConfig
from kdray.data.prepare import in_memory_synthetic
from kdray.engine import evaluate, make_loader, seed_everything, train_epoch
from kdray.models import ModelSpec
from kdray.session import ray_session
from kdray.teacher import fit_teacher
from kdray.teacher_worker import (
    STATE_FILE,
    ce_loss,
    make_scheduler,
    step_scheduler,
    step_setup,
)
from kdray.tracking import Tracker
from kdray.workspace import Workspace

# --quick: the same code on tiny sizes, to check that the script works.
QUICK = {"images_per_class": 8, "size": 32, "epochs": 3}


def plain_epochs(
    cfg: ExperimentConfig, data, spec: ModelSpec, epochs: int, out: Path
) -> dict[str, list[float]]:
    """The product's per-epoch work without Ray: seconds per whole epoch and per part."""
    t = cfg.teacher
    seed_everything(cfg.seed)
    # The workers' own set-up: threads, channels-last model and batches, precision.
    setup = step_setup(spec, t.weights, t.augment, t.amp, t.cpus_per_worker)
    model = setup.model
    optimizer = torch.optim.Adam(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    scheduler = make_scheduler(optimizer, t.schedule, t.epochs)
    train, val = data.splits["train"], data.splits["val"]
    loader = make_loader((train.images, train.labels), t.batch_size, True, cfg.seed)
    parts: dict[str, list[float]] = {"epoch": [], "train": [], "validate": [], "checkpoint": []}
    best_state = None
    for epoch in range(epochs):
        t0 = time.perf_counter()
        train_epoch(
            model,
            loader,
            ce_loss,
            optimizer,
            "cpu",
            setup.scaler,
            setup.augment,
            autocast=setup.autocast,
        )
        t1 = time.perf_counter()
        metrics = evaluate(model, val, list(data.spec.classes))[0]
        step_scheduler(scheduler, metrics["loss"])
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        t2 = time.perf_counter()
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "best_model": best_state,
            },
            out / STATE_FILE,
        )
        t3 = time.perf_counter()
        for key, value in (
            ("epoch", t3 - t0),
            ("train", t1 - t0),
            ("validate", t2 - t1),
            ("checkpoint", t3 - t2),
        ):
            parts[key].append(value)
    return parts


def trainer_epochs(cfg, data, spec, tracker: Tracker, storage: str, name: str) -> dict[str, object]:
    """The product's ``fit_teacher``: whole-epoch times between reports, train-only times, wall."""
    run_id = tracker.start_run(name, data.spec.id, "benchmark")
    started = time.time()
    fit_teacher(cfg, data, spec, tracker, run_id, name, storage)
    wall = time.time() - started
    client = MlflowClient(tracker.tracking_uri)
    history = sorted(client.get_metric_history(run_id, "val_accuracy"), key=lambda m: m.step)
    stamps = [m.timestamp / 1e3 for m in history]  # logged once per epoch, just before the report
    train_only = [
        m.value
        for m in sorted(client.get_metric_history(run_id, "epoch_seconds"), key=lambda m: m.step)
    ]
    return {
        "epochs": [b - a for a, b in zip(stamps, stamps[1:], strict=False)],
        "train": train_only,
        "wall": wall,
        "first_report": stamps[0] - started,
        "after_last": started + wall - stamps[-1],
        "checkpoint_mb": _checkpoint_mb(Path(storage) / name),
    }


def _checkpoint_mb(run_dir: Path) -> float:
    files = list(run_dir.glob(f"checkpoint_*/{STATE_FILE}"))
    return max((f.stat().st_size for f in files), default=0) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-per-class", type=int, default=96)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4, help="per side; the first one warms up")
    parser.add_argument("--two-workers", action="store_true", help="also time 2 workers x 1 CPU")
    parser.add_argument(
        "--quick", action="store_true", help="8 images per class at 32 px, 3 epochs per side"
    )
    args = parser.parse_args()
    if args.quick:  # smaller defaults; options given explicitly still win
        parser.set_defaults(**QUICK)
        args = parser.parse_args()
    if args.epochs < 3:
        parser.error("--epochs must be at least 3 (the first is excluded, two make a median)")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    data = in_memory_synthetic(
        "brain_tumor", args.images_per_class, args.size, val_fraction=0.1, test_fraction=0.1
    )
    spec = ModelSpec(
        kind="teacher", num_classes=4, image_size=args.size, class_names=list(data.spec.classes)
    )
    base = {"epochs": args.epochs, "batch_size": 32, "cpus_per_worker": 2, "num_workers": 1}
    cfg1 = ExperimentConfig.model_validate({"teacher": base})
    n = len(data.splits["train"])
    print(
        f"DenseNet121 teacher, {n} training / {len(data.splits['val'])} validation images "
        f"{args.size}x{args.size}, batch 32, 2 threads, {args.epochs} epochs per side "
        "(the first excluded)"
    )
    # Ray leaves its logs behind in its temp dir while shutting down: ignore them at cleanup.
    with tempfile.TemporaryDirectory(prefix="kdray-bench-", ignore_cleanup_errors=True) as tmp:
        ws = Workspace(Path(tmp))
        tracker = Tracker.open(MLflowConfig(tracking_uri=f"sqlite:///{tmp}/mlflow.db"), ws)
        # The product's local Ray, in a temp dir of its own: never another Ray on this machine.
        with ray_session(RayConfig(num_cpus=2, temp_dir=f"{tmp}/ray"), ws):
            plain_a = plain_epochs(cfg1, data, spec, args.epochs, Path(tmp))
            ray1 = trainer_epochs(cfg1, data, spec, tracker, tmp, "w1")
            plain_b = plain_epochs(cfg1, data, spec, args.epochs, Path(tmp))  # before and after
            ray2 = None
            if args.two_workers:
                cfg2 = ExperimentConfig.model_validate(
                    {"teacher": {**base, "num_workers": 2, "cpus_per_worker": 1}}
                )
                ray2 = trainer_epochs(cfg2, data, spec, tracker, tmp, "w2")

    def med(parts: dict, key: str) -> float:
        return statistics.median(parts[key][1:] if key != "epochs" else parts[key])

    plain = statistics.median(plain_a["epoch"][1:] + plain_b["epoch"][1:])
    trainer = statistics.median(ray1["epochs"])
    startup = ray1["wall"] - args.epochs * trainer
    print(f"Ray Train / plain, whole epoch: {trainer / plain:.3f}")
    print(f"Ray Train fixed start-up: {startup:.1f} s")
    print(f"\nwhole epoch: Ray Train {trainer:.2f} s, plain {plain:.2f} s (goal: ratio <= 1.15)")
    plain_parts = {
        k: statistics.median(plain_a[k][1:] + plain_b[k][1:])
        for k in ("train", "validate", "checkpoint")
    }
    ray_train = statistics.median(ray1["train"][1:])
    print(f"  training pass: Ray Train {ray_train:.2f} s, plain {plain_parts['train']:.2f} s")
    print(
        f"  plain validation {plain_parts['validate']:.2f} s, checkpoint save {plain_parts['checkpoint']:.3f} s "
        f"({ray1['checkpoint_mb']:.1f} MB)"
    )
    rest = trainer - ray_train - plain_parts["validate"] - plain_parts["checkpoint"]
    print(f"  the rest of a Ray Train epoch (MLflow log, checkpoint upload, report): {rest:.2f} s")
    print(
        f"fit(): wall {ray1['wall']:.1f} s = first report after {ray1['first_report']:.1f} s "
        f"(start-up + epoch 1), {len(ray1['epochs'])} epochs between reports, "
        f"{ray1['after_last']:.1f} s after the last report"
    )
    if ray2 is not None:
        print(
            f"2 workers x 1 CPU: whole epoch {statistics.median(ray2['epochs']):.2f} s "
            f"({n / statistics.median(ray2['epochs']):.1f} images/s)"
        )


if __name__ == "__main__":
    main()
