"""Teacher recipes against the CE-only student, side by side on one dataset (plain PyTorch).

The KD gain is only meaningful when the teacher knows more than the student can learn on its
own. This script trains DenseNet121 teachers with a few recipes and the default student with
cross-entropy only, on the same prepared data and input size as ``make run``, and prints each
model's validation accuracy per epoch (the learning curves) and the test accuracy of its best
validation epoch.

Held equal with the product, so that the comparison is the one ``make run`` makes: each teacher
trains as a Ray Train worker does, without Ray (``kdray.teacher_worker.step_setup``:
``teacher.weights``, channels-last model and batches, ``teacher.amp``'s precision; the whole
training split; its best epoch by validation accuracy, ties to the lower loss), and the CE student
is the product's CE baseline (:func:`kdray.trial.train_student` at alpha = 1 on the students' share
of the training split, ``data.synthetic.student_fraction`` for a synthetic stand-in; its best
validation epoch). Held equal between the models: the prepared data, its validation and test splits,
the seed and the torch threads (``--threads``). What a recipe changes is the only difference between
teachers.

    python benchmarks/teacher_recipe.py --dataset eye_disease --recipes current,no_zoom

``--quick`` (8 synthetic images per class at 32 px, one epoch per model, in a temporary
workspace: seconds) runs the same code to check that it works; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kdray.config import AugmentConfig, ExperimentConfig, load_config
from kdray.data.prepare import prepare_dataset
from kdray.engine import evaluate, make_loader, seed_everything, train_epoch
from kdray.models import ModelSpec, build_model
from kdray.teacher_worker import make_scheduler, step_scheduler, step_setup
from kdray.trial import StudentJob, train_student
from kdray.workspace import Workspace

RECIPES: dict[str, dict] = {
    # what configs/default.yaml's teacher does
    "current": {},
    # zoom changes the apparent size of the structures whose size is the class (cup, ventricles)
    "no_zoom": {"augment": {"zoom": 0.0}},
    "no_augment": {"augment": {"enabled": False}},
    "no_zoom_cosine": {"augment": {"zoom": 0.0}, "schedule": "cosine"},
    "no_zoom_smooth": {"augment": {"zoom": 0.0}, "label_smoothing": 0.1},
}
# --quick: the same code on tiny sizes (seconds), to check that the script works.
QUICK = {"epochs": 1, "workspace": None}
QUICK_SET = [
    "data.image_size=32",
    "data.synthetic.n_per_class=8",
    "data.synthetic.size=32",
    "student.epochs=1",
]


def _ce(smoothing: float):
    def loss(logits, y, _extras, _x):
        return {"loss": torch.nn.functional.cross_entropy(logits, y, label_smoothing=smoothing)}

    return loss


def train_ce_student(cfg: ExperimentConfig, data, seed: int) -> dict:
    """The product's CE-only baseline for one seed (``kdray.seed_runs.retrain_and_score``): the
    default student at alpha = 1 on the students' share of the training split, its best epoch on
    test."""
    classes = list(data.spec.classes)
    students = data.for_students(cfg.data.student_fraction(data.spec.id), cfg.data.split_seed)
    job = StudentJob(
        cfg,
        data.spec.id,
        classes,
        data.image_size,
        students.splits["train"],
        students.splits["val"],
    )
    widths = cfg.student.resolved_widths()
    spec = ModelSpec("student", len(classes), data.image_size, classes, widths=widths)
    best = build_model(spec)
    curve: list[float] = []
    epochs, started = cfg.student.epochs, time.perf_counter()

    def report(metrics: dict, _checkpoint: Path) -> None:
        curve.append(metrics["val_accuracy"])
        print(
            f"  student epoch {len(curve)}/{epochs}: val {curve[-1]:.3f} "
            f"({time.perf_counter() - started:.0f} s)",
            flush=True,
        )

    final = train_student(
        job, 1.0, cfg.kd.temperature, widths, report, seed=seed, best_model_out=best
    )
    tm, _ = evaluate(best, data.splits["test"], classes)
    return {
        "curve": curve,
        "val": final["best_val_accuracy"],
        "test": tm["accuracy"],
        "seconds": time.perf_counter() - started,
    }


def train_teacher(
    cfg: ExperimentConfig, data, recipe: dict, epochs: int, seed: int, threads: int
) -> dict:
    """One teacher as a Ray Train worker trains it (one worker), with ``recipe``'s changes."""
    seed_everything(seed)
    train_split, val, test = data.splits["train"], data.splits["val"], data.splits["test"]
    classes = list(data.spec.classes)
    t = cfg.teacher
    spec = ModelSpec(
        kind="teacher",
        num_classes=len(classes),
        image_size=data.image_size,
        class_names=classes,
        arch=t.arch,
        dataset=data.spec.id,
    )
    aug_cfg = AugmentConfig.model_validate({**t.augment.model_dump(), **recipe.get("augment", {})})
    # The workers' own set-up: weights, channels-last model and batches, precision, threads.
    setup = step_setup(spec, t.weights, aug_cfg, t.amp, threads)
    model = setup.model
    optimizer = torch.optim.Adam(
        model.parameters(), lr=recipe.get("lr", t.lr), weight_decay=t.weight_decay
    )
    scheduler = make_scheduler(optimizer, recipe.get("schedule", t.schedule), epochs)
    loader = make_loader(
        (train_split.images, train_split.labels), t.batch_size, shuffle=True, seed=seed
    )
    curve, started = [], time.perf_counter()
    best_acc, best_loss, best_state = -1.0, float("inf"), None
    loss_fn = _ce(recipe.get("label_smoothing", 0.0))
    for _ in range(epochs):
        train_epoch(
            model,
            loader,
            loss_fn,
            optimizer,
            "cpu",
            setup.scaler,
            setup.augment,
            autocast=setup.autocast,
        )
        vm, _ = evaluate(model, val, classes)
        step_scheduler(scheduler, vm["loss"])
        curve.append(vm["accuracy"])
        print(
            f"  teacher epoch {len(curve)}/{epochs}: val {vm['accuracy']:.3f} "
            f"({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
        # The product's rule (kdray.teacher_worker): higher accuracy, or equal with a lower loss.
        if vm["accuracy"] > best_acc or (vm["accuracy"] == best_acc and vm["loss"] < best_loss):
            best_acc, best_loss = vm["accuracy"], vm["loss"]
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    tm, _ = evaluate(model, test, classes)
    return {
        "curve": curve,
        "val": best_acc,
        "test": tm["accuracy"],
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="eye_disease")
    parser.add_argument(
        "--config", default=str(Path(__file__).parent.parent / "configs" / "default.yaml")
    )
    parser.add_argument("--recipes", default="current,no_zoom")
    parser.add_argument("--epochs", type=int, default=None, help="teacher epochs (default: config)")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--workspace",
        default="/tmp/kdray-teacher-recipe",
        help="data cache (--quick: a temporary one)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="8 images per class at 32 px, 1 epoch per model, temporary workspace",
    )
    args = parser.parse_args()
    if args.quick:  # smaller defaults; options given explicitly still win
        parser.set_defaults(**QUICK)
        args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, QUICK_SET if args.quick else None)
    with tempfile.TemporaryDirectory(prefix="kdray-teacher-recipe-") as tmp:  # for --quick
        workspace = Workspace(Path(args.workspace or tmp)).create()
        data = prepare_dataset(cfg.data, args.dataset, workspace)
    share = cfg.data.student_fraction(args.dataset)
    n_students = len(data.student_indices(share, cfg.data.split_seed))
    print(
        f"{args.dataset}: {data.manifest.counts()} images at {data.image_size} px; the CE "
        f"student trains on {n_students} of the training split ({share:g} of each class)"
    )
    rows = []

    def show(label: str, seed: int, out: dict) -> None:
        rows.append((label, seed, out))
        curve = " ".join(f"{a:.2f}" for a in out["curve"])
        print(
            f"{label:26s} seed {seed}: test {out['test']:.3f} (best val {out['val']:.3f}, "
            f"{out['seconds']:.0f} s) val curve: {curve}",
            flush=True,
        )

    for seed in map(int, args.seeds.split(",")):
        torch.set_num_threads(args.threads)  # a teacher's step_setup set it too: the same number
        show("CE student", seed, train_ce_student(cfg, data, seed))
        for name in args.recipes.split(","):
            epochs = args.epochs or cfg.teacher.epochs
            show(
                f"teacher {name}",
                seed,
                train_teacher(cfg, data, RECIPES[name], epochs, seed, args.threads),
            )
    print("mean test accuracy over seeds:")
    for label in dict.fromkeys(r[0] for r in rows):
        print(f"  {label:26s} {np.mean([r[2]['test'] for r in rows if r[0] == label]):.3f}")


if __name__ == "__main__":
    main()
