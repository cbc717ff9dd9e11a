"""Teacher recipes against the CE-only student, side by side on one dataset (plain PyTorch).

The KD gain is only meaningful when the teacher knows more than the student can learn on its
own. This script trains DenseNet121 teachers with a few recipes and the default student with
cross-entropy only, on the same prepared data and input size as ``make run``, and prints each
model's validation accuracy per epoch (the learning curves) and the test accuracy of its best
validation epoch.

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

from kdray.augment import build_augment
from kdray.config import AugmentConfig, ExperimentConfig, load_config
from kdray.data.prepare import prepare_dataset
from kdray.engine import evaluate, make_loader, seed_everything, train_epoch
from kdray.models import ModelSpec, build_model
from kdray.teacher import make_scheduler, step_scheduler
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


def train(kind: str, cfg: ExperimentConfig, data, recipe: dict, epochs: int, seed: int) -> dict:
    seed_everything(seed)
    train_split, val, test = data.splits["train"], data.splits["val"], data.splits["test"]
    classes = list(data.spec.classes)
    if kind == "teacher":
        t = cfg.teacher
        spec = ModelSpec(
            kind="teacher",
            num_classes=len(classes),
            image_size=data.image_size,
            class_names=classes,
        )
        lr, batch, wd = recipe.get("lr", t.lr), t.batch_size, t.weight_decay
        aug_cfg = AugmentConfig.model_validate(
            {**t.augment.model_dump(), **recipe.get("augment", {})}
        )
        augment = build_augment(aug_cfg)
    else:
        s = cfg.student
        spec = ModelSpec(
            kind="student",
            num_classes=len(classes),
            image_size=data.image_size,
            class_names=classes,
            widths=s.resolved_widths(),
        )
        lr, batch, wd, augment = s.lr, s.batch_size, s.weight_decay, None
    model = build_model(spec)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)
    scheduler = make_scheduler(optimizer, recipe.get("schedule", "plateau"), epochs)
    loader = make_loader((train_split.images, train_split.labels), batch, shuffle=True, seed=seed)
    curve, best, started = [], (-1.0, None), time.perf_counter()
    loss_fn = _ce(recipe.get("label_smoothing", 0.0))
    for _ in range(epochs):
        train_epoch(model, loader, loss_fn, optimizer, "cpu", None, augment)
        vm, _ = evaluate(model, val, classes)
        step_scheduler(scheduler, vm["loss"])
        curve.append(vm["accuracy"])
        print(
            f"  {kind} epoch {len(curve)}/{epochs}: val {vm['accuracy']:.3f} "
            f"({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
        if vm["accuracy"] > best[0]:
            best = (vm["accuracy"], {k: v.clone() for k, v in model.state_dict().items()})
    model.load_state_dict(best[1])
    tm, _ = evaluate(model, test, classes)
    return {
        "curve": curve,
        "val": best[0],
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
    print(f"{args.dataset}: {data.manifest.counts()} images at {data.image_size} px")
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
        show("CE student", seed, train("student", cfg, data, {}, cfg.student.epochs, seed))
        for name in args.recipes.split(","):
            show(
                f"teacher {name}",
                seed,
                train("teacher", cfg, data, RECIPES[name], args.epochs or cfg.teacher.epochs, seed),
            )
    print("mean test accuracy over seeds:")
    for label in dict.fromkeys(r[0] for r in rows):
        print(f"  {label:26s} {np.mean([r[2]['test'] for r in rows if r[0] == label]):.3f}")


if __name__ == "__main__":
    main()
