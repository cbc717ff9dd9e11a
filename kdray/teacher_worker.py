"""The teacher's training step and loop, as every Ray Train worker (DDP rank) runs it.

:func:`train_loop_per_worker` is the function :func:`kdray.teacher.fit_teacher` hands its
TorchTrainer (imported by module path in every worker): one rank's epochs of DenseNet121
training, rank-0 validation shared with every rank, the lr schedule, early stopping, MLflow
metrics from rank 0 and a checkpoint (``state.pt``) per epoch to resume from.
:func:`step_setup` decides how a training step runs (model, memory format, augmentation,
precision), for the workers and for the benchmarks measured against them.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kdray.augment import build_augment
from kdray.data.prepare import Split
from kdray.engine import (
    amp_dtype,
    channels_last,
    evaluate,
    make_loader,
    seed_everything,
    train_epoch,
)
from kdray.models import ModelSpec, build_model, unwrap
from kdray.tracking import Tracker

__all__ = [
    "STATE_FILE",
    "StepSetup",
    "ce_loss",
    "make_scheduler",
    "step_scheduler",
    "step_setup",
    "train_loop_per_worker",
]

STATE_FILE = "state.pt"


def ce_loss(
    logits: torch.Tensor, y: torch.Tensor, _extras: tuple, _x: torch.Tensor
) -> dict[str, torch.Tensor]:
    return {"loss": F.cross_entropy(logits, y)}


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, epochs: int) -> Any:
    """The teacher's lr schedule (``teacher.schedule``), stepped once per epoch by :func:`step_scheduler`."""
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=2)


def step_scheduler(scheduler: Any, val_loss: float) -> None:
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(val_loss)
    else:
        scheduler.step()


def _validate_on_rank0(
    model: torch.nn.Module,
    val: Split,
    class_names: list[str],
    device: torch.device,
    rank: int,
    world: int,
) -> dict[str, Any]:
    """Rank 0 scores the validation split and shares the result with every rank.

    DDP keeps the weights in sync but not BatchNorm's running statistics, so ranks would score
    slightly differently; one shared result keeps the LR schedule and early stopping identical
    on every rank (and the ``ray.train.report`` calls equal in number).
    """
    metrics = evaluate(model, val, class_names, device)[0] if rank == 0 else None
    if world > 1:
        import torch.distributed as dist

        box = [metrics]
        dist.broadcast_object_list(box, src=0)
        metrics = box[0]
    return metrics


@dataclass
class StepSetup:
    """How a teacher's training step runs: the model in its memory format, the augmentation that
    hands it batches in that format, the mixed precision. One place decides (:func:`step_setup`),
    for the Ray Train workers and for anything measured against them (the plain loop of
    ``benchmarks/train_overhead.py``)."""

    model: torch.nn.Module
    augment: Callable[[torch.Tensor], torch.Tensor]
    dtype: torch.dtype | None  # float16 (CUDA, with scaler), bfloat16 (CPU with AMX) or None
    scaler: torch.amp.GradScaler | None

    @property
    def autocast(self) -> torch.dtype | None:
        """What :func:`kdray.engine.train_epoch` takes as ``autocast`` (bf16 only: fp16 goes
        through the scaler)."""
        return self.dtype if self.dtype == torch.bfloat16 else None


def step_setup(
    spec: ModelSpec,
    weights: str | None,
    augment: Any,
    amp: bool,
    threads: int,
    device: torch.device | str = "cpu",
) -> StepSetup:
    """Threads, model, memory format, augmentation and precision of a teacher's training step.

    ``teacher.amp``: float16 + GradScaler on CUDA, bfloat16 on a CPU with AMX, else fp32
    (validation runs in fp32 either way). Channels-last in every precision: on a CPU without AMX
    a fp32 step takes about 0.8x the time in it (DenseNet121, 64 px, batch 32, 2 threads).
    """
    torch.set_num_threads(threads)
    device = torch.device(device)
    dtype = amp_dtype(device, amp)
    return StepSetup(
        model=build_model(spec, weights).to(memory_format=torch.channels_last),
        augment=channels_last(build_augment(augment)),
        dtype=dtype,
        scaler=torch.amp.GradScaler("cuda") if dtype == torch.float16 else None,
    )


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker (DDP rank)."""
    import ray
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    arrays = ray.get(config["data"])  # from the object store: no shared disk needed
    train, val = arrays["train"], arrays["val"]
    seed_everything(config["seed"])
    spec = ModelSpec.from_dict(config["spec"])
    device = ray.train.torch.get_device()
    setup = step_setup(
        spec, config["weights"], config["augment"], config["amp"], config["threads"], device
    )
    dtype, scaler, augment = setup.dtype, setup.scaler, setup.augment
    model = ray.train.torch.prepare_model(setup.model)
    if rank == 0:
        config["tracker"].set_tags(
            config["run_id"],
            {"kdray.precision": str(dtype or torch.float32).removeprefix("torch.")},
        )
    per_worker_batch = max(1, config["batch_size"] // world)
    loader = make_loader(
        (train.images, train.labels),
        per_worker_batch,
        shuffle=True,
        seed=config["seed"],
        pin_memory=device.type == "cuda",
    )
    loader = ray.train.torch.prepare_data_loader(loader, move_to_device=False)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"]
    )
    scheduler = make_scheduler(optimizer, config["schedule"], config["epochs"])
    tracker: Tracker = config["tracker"]
    run_id: str = config["run_id"]

    start_epoch, best = 0, {"val_accuracy": -1.0, "val_loss": float("inf"), "epoch": -1}
    best_state: dict[str, torch.Tensor] | None = None
    stale = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best, best_state, stale = (
            state["epoch"] + 1,
            state["best"],
            state["best_model"],
            state["stale"],
        )
        if rank == 0:
            tracker.set_tags(run_id, {"kdray.resumed_from_epoch": start_epoch})
    # Epochs after the last registered checkpoint (all, if none registered before a worker or
    # the driver died) are trained again; those the run already has stay as logged first.
    logged = tracker.logged_steps(run_id, "val_accuracy") if rank == 0 else set()

    for epoch in range(start_epoch, config["epochs"]):
        if world > 1:
            loader.sampler.set_epoch(epoch)
        started = time.perf_counter()
        stats = train_epoch(
            model,
            loader,
            ce_loss,
            optimizer,
            device,
            scaler,
            augment,
            autocast=setup.autocast,
        )
        seconds = time.perf_counter() - started
        val_metrics = _validate_on_rank0(
            unwrap(model), val, config["class_names"], device, rank, world
        )
        step_scheduler(scheduler, val_metrics["loss"])
        improved = val_metrics["accuracy"] > best["val_accuracy"] or (
            val_metrics["accuracy"] == best["val_accuracy"]
            and val_metrics["loss"] < best["val_loss"]
        )
        if improved:
            best = {
                "val_accuracy": val_metrics["accuracy"],
                "val_loss": val_metrics["loss"],
                "epoch": epoch,
            }
            best_state = {
                k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()
            }
            stale = 0
        else:
            stale += 1
        metrics = {
            "epoch": epoch,
            "train_loss": stats["loss"],
            "train_accuracy": stats["accuracy"],
            "val_loss": val_metrics["loss"],
            "val_accuracy": val_metrics["accuracy"],
            "lr": optimizer.param_groups[0]["lr"],
            "epoch_seconds": seconds,
            "images_per_second": len(train) / seconds,
            "best_val_accuracy": best["val_accuracy"],
        }
        stop = config["patience"] > 0 and stale >= config["patience"]
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                if epoch not in logged:
                    tracker.log_metrics(
                        run_id, {k: v for k, v in metrics.items() if k != "epoch"}, step=epoch
                    )
                torch.save(
                    {
                        "model": unwrap(model).state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "epoch": epoch,
                        "best": best,
                        "best_model": best_state,
                        "stale": stale,
                    },
                    Path(tmp) / STATE_FILE,
                )
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
        if stop:
            break
