"""Teacher training through Ray Train's TorchTrainer vs the same loop in plain PyTorch.

One run, side by side: the same data, model, batch, augmentation and threads. Prints the
per-epoch training time of each and their ratio (goal: TorchTrainer / plain <= 1.15), the fixed
start-up cost of a TorchTrainer fit, and images/s with 1 and 2 CPU workers.

    .venv/bin/python benchmarks/train_overhead.py [--images-per-class 128] [--size 64] [--epochs 2]
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

from kdray.augment import build_augment
from kdray.config import ExperimentConfig, MLflowConfig, RayConfig
from kdray.data.prepare import in_memory_synthetic
from kdray.engine import make_loader, seed_everything, train_epoch
from kdray.models import ModelSpec, build_model
from kdray.pipeline import ray_session
from kdray.teacher import _ce_loss, fit_teacher
from kdray.tracking import Tracker
from kdray.workspace import Workspace


def plain_epochs(cfg: ExperimentConfig, data, spec: ModelSpec, epochs: int) -> list[float]:
    torch.set_num_threads(cfg.teacher.cpus_per_worker)
    seed_everything(cfg.seed)
    model = build_model(spec)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.teacher.lr)
    train = data.splits["train"]
    loader = make_loader((train.images, train.labels), cfg.teacher.batch_size, True, cfg.seed)
    augment = build_augment(cfg.teacher.augment)
    times = []
    for _ in range(epochs):
        started = time.perf_counter()
        train_epoch(model, loader, _ce_loss, optimizer, "cpu", None, augment)
        times.append(time.perf_counter() - started)
    return times


def trainer_epochs(cfg, data, spec, tracker: Tracker, storage: str, name: str) -> tuple[list[float], list[float], float]:
    run_id = tracker.start_run(name, data.spec.id, "benchmark")
    started = time.perf_counter()
    fit_teacher(cfg, data, spec, tracker, run_id, name, storage)
    wall = time.perf_counter() - started
    client = MlflowClient(tracker.tracking_uri)
    secs = [m.value for m in sorted(client.get_metric_history(run_id, "epoch_seconds"), key=lambda m: m.step)]
    ips = [m.value for m in sorted(client.get_metric_history(run_id, "images_per_second"), key=lambda m: m.step)]
    return secs, ips, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-per-class", type=int, default=128)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2, help="per measurement; the first warms up")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    data = in_memory_synthetic("brain_tumor", args.images_per_class, args.size, val_fraction=0.1,
                               test_fraction=0.1)
    spec = ModelSpec(kind="teacher", num_classes=4, image_size=args.size, class_names=list(data.spec.classes))
    base = {"epochs": args.epochs, "batch_size": 32, "cpus_per_worker": 2, "num_workers": 1}
    cfg1 = ExperimentConfig.model_validate({"teacher": base})
    cfg2 = ExperimentConfig.model_validate({"teacher": {**base, "num_workers": 2, "cpus_per_worker": 1}})
    n = len(data.splits["train"])
    print(f"DenseNet121 teacher, {n} training images {args.size}x{args.size}, batch 32, "
          f"{args.epochs} epochs per measurement (the first one warms up)")
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(Path(tmp))
        tracker = Tracker.open(MLflowConfig(tracking_uri=f"sqlite:///{tmp}/mlflow.db"), ws)
        # The product's local Ray (workers at normal priority, private temp dir).
        with ray_session(RayConfig(num_cpus=2), ws):
            plain_a = plain_epochs(cfg1, data, spec, args.epochs)
            ray1, ips1, wall1 = trainer_epochs(cfg1, data, spec, tracker, tmp, "w1")
            plain_b = plain_epochs(cfg1, data, spec, args.epochs)
            ray2, ips2, wall2 = trainer_epochs(cfg2, data, spec, tracker, tmp, "w2")
    plain = statistics.median(plain_a[1:] + plain_b[1:])
    trainer = statistics.median(ray1[1:])
    print(f"\n{'':34}{'epoch s':>10}{'images/s':>10}")
    print(f"{'plain PyTorch (2 threads)':34}{plain:>10.2f}{n / plain:>10.1f}")
    print(f"{'TorchTrainer, 1 worker x 2 CPUs':34}{trainer:>10.2f}{statistics.median(ips1[1:]):>10.1f}")
    print(f"{'TorchTrainer, 2 workers x 1 CPU':34}{statistics.median(ray2[1:]):>10.2f}{statistics.median(ips2[1:]):>10.1f}")
    print(f"\nratio TorchTrainer(1 worker) / plain, per epoch: {trainer / plain:.3f}  (goal <= 1.15)")
    print(f"fit() wall time incl. worker start-up and validation: 1 worker {wall1:.1f} s, "
          f"2 workers {wall2:.1f} s, vs {args.epochs} plain epochs {sum(plain_a):.1f} s")


if __name__ == "__main__":
    main()
