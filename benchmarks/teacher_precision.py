"""The teacher's training step in fp32 vs ``teacher.amp``'s CPU bf16 (both channels-last).

Side by side in one run, interleaved: a DenseNet121 training step (forward, loss, backward, Adam
step) on synthetic images, as the teacher loop runs it (``kdray.engine.train_epoch`` with and
without ``autocast``). Then, to check that bf16 does not cost accuracy, the validation accuracy
of a few epochs of each on the same synthetic dataset and seed.

Held equal between fp32 and bf16: the model and its initial weights (same seed), its memory format
and the batches' (channels-last on both sides: ``kdray.teacher_worker.step_setup`` builds both, as
the Ray Train workers get theirs), the batch, the input size, the threads, no augmentation on either
side, two untimed warm-up steps each, the number of timed steps, and the order (each round
alternates which mode goes first). Only the autocast dtype differs. The accuracy check also holds
the data, the loader's order and the validation pass (fp32 on both) equal.

Prints ``bf16 / fp32 step time: <ratio>`` (below 1 is faster) and both validation curves. On a CPU
without AMX ``teacher.amp`` trains in fp32 (``kdray.engine.amp_dtype``); this script measures bf16
there all the same, to show why.

    .venv/bin/python benchmarks/teacher_precision.py [--dataset eye_disease] [--steps 8] [--epochs 4]

``--quick`` (32 px, batch 4, one timed step per mode, one epoch on 4 images per class: seconds)
runs the same code to check that it works; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from kdray.config import AugmentConfig
from kdray.data.prepare import in_memory_synthetic
from kdray.engine import cpu_has_amx, evaluate, make_loader, seed_everything, train_epoch
from kdray.models import ModelSpec
from kdray.teacher_worker import StepSetup, step_setup

MODES = {"fp32": None, "bf16": torch.bfloat16}
# --quick: the same code on tiny sizes (seconds), to check that the script works.
QUICK = {"size": 32, "batch": 4, "steps": 1, "rounds": 1, "per_class": 4, "epochs": 1}


def _ce(logits, y, _extras, _x):
    return {"loss": F.cross_entropy(logits, y)}


def _train(setup: StepSetup, loader, optimizer: torch.optim.Optimizer, mode: str) -> None:
    """One pass as the teacher loop runs it, with ``mode``'s autocast dtype."""
    train_epoch(setup.model, loader, _ce, optimizer, augment=setup.augment, autocast=MODES[mode])


def _setup(spec: ModelSpec, seed: int, threads: int) -> StepSetup:
    """The workers' own step set-up (channels-last model and batches, threads), without
    augmentation; the precision is this script's to choose (bf16 also where amp would not)."""
    seed_everything(seed)
    return step_setup(spec, None, AugmentConfig(enabled=False), False, threads)


def step_times(
    spec: ModelSpec, batch: int, steps: int, rounds: int, threads: int
) -> dict[str, list[float]]:
    x = torch.randint(0, 256, (batch, 3, spec.image_size, spec.image_size), dtype=torch.uint8)
    y = torch.randint(0, spec.num_classes, (batch,))
    loader = [(x, y)]
    times: dict[str, list[float]] = {m: [] for m in MODES}
    setups = {m: _setup(spec, 0, threads) for m in MODES}
    optims = {m: torch.optim.Adam(setups[m].model.parameters(), lr=1e-3) for m in MODES}
    for m in MODES:  # warm-up: oneDNN picks its kernels on the first steps
        for _ in range(2):
            _train(setups[m], loader, optims[m], m)
    for r in range(rounds):
        # Each mode goes first every other round: neither always runs on the other's heels.
        for m in list(MODES) if r % 2 == 0 else list(reversed(MODES)):
            for _ in range(steps):
                started = time.perf_counter()
                _train(setups[m], loader, optims[m], m)
                times[m].append(time.perf_counter() - started)
    return times


def curves(
    dataset: str, size: int, per_class: int, epochs: int, batch: int, threads: int
) -> dict[str, list[float]]:
    data = in_memory_synthetic(
        dataset, per_class, size, seed=0, val_fraction=0.15, test_fraction=0.15
    )
    classes = list(data.spec.classes)
    spec = ModelSpec(kind="teacher", num_classes=len(classes), image_size=size, class_names=classes)
    out: dict[str, list[float]] = {}
    for mode in MODES:
        setup = _setup(spec, 0, threads)
        optimizer = torch.optim.Adam(setup.model.parameters(), lr=1e-3)
        train = data.splits["train"]
        loader = make_loader((train.images, train.labels), batch, shuffle=True, seed=0)
        out[mode] = []
        for _ in range(epochs):
            _train(setup, loader, optimizer, mode)
            metrics, _ = evaluate(setup.model, data.splits["val"], classes)
            out[mode].append(metrics["accuracy"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="eye_disease")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per mode per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=120, help="synthetic images per class")
    parser.add_argument(
        "--epochs", type=int, default=4, help="epochs of the accuracy check (0: skip)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="32 px, batch 4, 1 step, 1 round, 1 epoch"
    )
    args = parser.parse_args()
    if args.quick:  # smaller defaults; options given explicitly still win
        parser.set_defaults(**QUICK)
        args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU AMX bf16: {cpu_has_amx()}; torch {torch.__version__}; {args.threads} threads")
    spec = ModelSpec(kind="teacher", num_classes=4, image_size=args.size, class_names=list("abcd"))
    times = step_times(spec, args.batch, args.steps, args.rounds, args.threads)
    med = {m: statistics.median(t) for m, t in times.items()}
    for m in MODES:
        print(
            f"{m}: {med[m] * 1000:.0f} ms a step (median of {len(times[m])}, batch {args.batch}, "
            f"{args.size} px)"
        )
    print(f"bf16 / fp32 step time: {med['bf16'] / med['fp32']:.2f}")
    if args.epochs:
        acc = curves(args.dataset, args.size, args.per_class, args.epochs, args.batch, args.threads)
        for m, values in acc.items():
            print(
                f"{m} val accuracy per epoch ({args.dataset}): "
                + " ".join(f"{v:.3f}" for v in values)
            )


if __name__ == "__main__":
    main()
