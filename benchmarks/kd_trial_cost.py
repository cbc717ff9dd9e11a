"""Cost of one KD student epoch: cached teacher logits vs live teacher vs CE only (no teacher).

One run, the three modes interleaved (machines are shared and noisy), medians printed with the
ratio cached / CE-only (goal <= 1.2) and live / cached. The live teacher travels as a trial gets
it: its saved files as bytes (``StudentJob.teacher_files``).

Held equal between the modes: the code (every mode is the product's
:func:`kdray.trial.train_student`, so the same channels-last student and batches, Adam, KD loss
module and validation pass), the data (the whole synthetic training split, the same order), the
student's widths and seed, the batch (32; the default config's is 16), the torch threads
(``--threads``, a trial's CPUs), one untimed warm-up epoch per mode, the number of timed epochs,
and the order (it reverses every round). Only the teacher's part differs: none (alpha = 1),
cached logits as a loader column, or the teacher run on every batch. The time is the training
pass only (``epoch_seconds``), not the validation.

    .venv/bin/python benchmarks/kd_trial_cost.py [--images-per-class 128] [--size 64] [--repeats 3]

``--quick`` (8 images per class at 32 px, one round: seconds) runs the same code to check that it
works; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from kdray.config import ExperimentConfig
from kdray.data.prepare import in_memory_synthetic
from kdray.engine import predict_logits
from kdray.models import ModelSpec, build_model, model_files, save_model
from kdray.trial import StudentJob, train_student

# --quick: the same code on tiny sizes (seconds), to check that the script works.
QUICK = {"images_per_class": 8, "size": 32, "repeats": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-per-class", type=int, default=128)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (a Tune trial's CPUs)"
    )
    parser.add_argument("--quick", action="store_true", help="8 images per class, 32 px, 1 round")
    args = parser.parse_args()
    if args.quick:  # smaller defaults; options given explicitly still win
        parser.set_defaults(**QUICK)
        args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = in_memory_synthetic(
        "eye_disease", args.images_per_class, args.size, val_fraction=0.1, test_fraction=0.1
    )
    classes = list(data.spec.classes)
    spec = ModelSpec(kind="teacher", num_classes=4, image_size=args.size, class_names=classes)
    teacher = build_model(spec).eval()
    cfg = ExperimentConfig.model_validate({"student": {"epochs": 1, "batch_size": 32}})
    widths = cfg.student.resolved_widths()
    with tempfile.TemporaryDirectory() as tmp:
        teacher_files = model_files(save_model(teacher, spec, Path(tmp) / "teacher"))
        logits = predict_logits(teacher, data.splits["train"].images)
        common = (cfg, data.spec.id, classes, args.size, data.splits["train"], data.splits["val"])
        jobs = {
            "CE only (alpha=1)": (StudentJob(*common), 1.0),
            "KD, cached logits": (StudentJob(*common, teacher_logits=logits), 0.5),
            "KD, live teacher": (StudentJob(*common, teacher_files=teacher_files), 0.5),
        }
        for job, alpha in jobs.values():  # warm-up: oneDNN builds each mode's kernels once
            train_student(job, alpha, 4.0, widths)
        times: dict[str, list[float]] = {name: [] for name in jobs}
        for r in range(args.repeats):
            # The order reverses every round: no mode always runs first (or last).
            for name in list(jobs) if r % 2 == 0 else list(reversed(jobs)):
                job, alpha = jobs[name]
                times[name].append(train_student(job, alpha, 4.0, widths)["epoch_seconds"])
    med = {name: statistics.median(t) for name, t in times.items()}
    n = len(data.splits["train"])
    print(
        f"student {'-'.join(map(str, widths))}, {n} images {args.size}x{args.size}, "
        f"{args.threads} thread(s), median of {args.repeats}"
    )
    for name, seconds in med.items():
        print(f"  {name:22} {seconds:7.2f} s/epoch  {n / seconds:7.1f} images/s")
    ce, cached, live = med["CE only (alpha=1)"], med["KD, cached logits"], med["KD, live teacher"]
    print(f"ratio cached / CE-only: {cached / ce:.3f}  (goal <= 1.2)")
    print(f"ratio live / cached:    {live / cached:.2f}")


if __name__ == "__main__":
    main()
