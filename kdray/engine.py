"""The training and evaluation loop shared by the teacher (Ray Train) and the students (Ray Tune)."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kdray.data.prepare import Split
from kdray.metrics import calibration, classification_metrics

__all__ = [
    "amp_dtype",
    "channels_last",
    "cpu_has_amx",
    "evaluate",
    "make_loader",
    "memory_format_of",
    "predict_logits",
    "seed_everything",
    "softmax",
    "to_input",
    "train_epoch",
]

# loss_fn(logits, labels, extras, inputs) -> {"loss": ..., other scalars}; ``extras`` are the
# loader's per-sample tensors after images and labels (e.g. cached teacher logits).
LossFn = Callable[
    [torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor], dict[str, torch.Tensor]
]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """Share memory where possible; arrays from Ray's object store are read-only, so copy those."""
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def to_input(images: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float in [0, 1] on ``device``; the models normalise inside."""
    return images.to(device, non_blocking=True).float().div_(255.0)


def make_loader(
    arrays: tuple[np.ndarray, ...],
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over in-memory arrays (images, labels, and any per-sample extras)."""
    dataset = TensorDataset(*(_as_tensor(a) for a in arrays))
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, pin_memory=pin_memory
    )


def cpu_has_amx(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Does this CPU have AMX bf16 tiles (Intel Sapphire Rapids and newer)? False where unknown."""
    try:
        with open(cpuinfo) as f:
            return any(line.startswith("flags") and " amx_bf16" in line for line in f)
    except OSError:
        return False


def amp_dtype(device: torch.device, enabled: bool, amx: bool | None = None) -> torch.dtype | None:
    """The autocast dtype of mixed-precision training on ``device``, or None for fp32.

    float16 (with a GradScaler) on CUDA; bfloat16 on a CPU with AMX, where oneDNN runs bf16
    convolutions in hardware (a DenseNet121 training step at 64 px, batch 32, channels-last:
    0.58x the fp32 time on this project's 2-core machines, ``benchmarks/teacher_precision.py``);
    fp32 on other CPUs, where bf16 is emulated and slower.
    """
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and (cpu_has_amx() if amx is None else amx):
        return torch.bfloat16
    return None


def channels_last(
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``augment`` (if any), then the batch in channels-last memory format: the layout oneDNN's
    bf16 convolutions are fast in (pass it as :func:`train_epoch`'s ``augment``)."""

    def apply(x: torch.Tensor) -> torch.Tensor:
        return (augment(x) if augment is not None else x).contiguous(
            memory_format=torch.channels_last
        )

    return apply


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    device: torch.device | str = "cpu",
    scaler: torch.amp.GradScaler | None = None,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    autocast: torch.dtype | None = None,
) -> dict[str, float]:
    """One pass over ``loader``; ``loss_fn`` (see :data:`LossFn`) returns a dict with ``loss``.

    ``augment`` transforms each float input batch (training only); ``scaler`` turns on mixed
    precision (CUDA, float16); ``autocast`` names the mixed-precision dtype instead (bfloat16 on
    a CPU, which needs no scaler).

    Returns:
        The sample-weighted mean of every entry of the loss dict, plus ``accuracy``.
    """
    model.train()
    device = torch.device(device)
    totals: dict[str, float] = {}
    correct = seen = 0
    for batch in loader:
        x = to_input(batch[0], device)
        if augment is not None:
            x = augment(x)
        y = batch[1].to(device, non_blocking=True)
        extras = tuple(t.to(device, non_blocking=True) for t in batch[2:])
        optimizer.zero_grad(set_to_none=True)
        dtype = autocast or (torch.float16 if scaler is not None else None)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(x)
            losses = loss_fn(logits.float(), y, extras, x)
        if scaler is not None:
            scaler.scale(losses["loss"]).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            losses["loss"].backward()
            optimizer.step()
        n = y.shape[0]
        for key, value in losses.items():
            totals[key] = totals.get(key, 0.0) + float(value.detach()) * n
        correct += int((logits.argmax(1) == y).sum())
        seen += n
    out = {key: value / max(seen, 1) for key, value in totals.items()}
    out["accuracy"] = correct / max(seen, 1)
    return out


def memory_format_of(model: nn.Module) -> torch.memory_format:
    """``channels_last`` when the model's first 4-D weight is stored so, else contiguous: feed
    inputs in the model's layout (a layout mismatch makes oneDNN convert every layer)."""
    for param in model.parameters():
        if param.dim() == 4:
            if param.is_contiguous(memory_format=torch.channels_last) and not param.is_contiguous():
                return torch.channels_last
            break
    return torch.contiguous_format


@torch.no_grad()
def predict_logits(
    model: nn.Module, images: np.ndarray, batch_size: int = 128, device: torch.device | str = "cpu"
) -> np.ndarray:
    """Logits (N, classes) for uint8 images (N, 3, H, W), in eval mode and the model's layout."""
    was_training = model.training
    model.eval()
    layout = memory_format_of(model)
    out = []
    for start in range(0, len(images), batch_size):
        x = to_input(_as_tensor(images[start : start + batch_size]), device)
        out.append(model(x.contiguous(memory_format=layout)).float().cpu())
    model.train(was_training)
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(out).numpy()


def evaluate(
    model: nn.Module,
    split: Split,
    class_names: list[str],
    device: torch.device | str = "cpu",
    batch_size: int = 128,
) -> tuple[dict[str, Any], np.ndarray]:
    """Metrics (plus ``loss``: mean cross-entropy, ``ece``: expected calibration error) of
    ``model`` on ``split``, and its logits."""
    logits = predict_logits(model, split.images, batch_size=batch_size, device=device)
    metrics = classification_metrics(split.labels, logits.argmax(1), class_names)
    metrics["loss"] = float(F.cross_entropy(torch.from_numpy(logits), _as_tensor(split.labels)))
    metrics["ece"] = calibration(softmax(logits), split.labels)["ece"]
    return metrics, logits


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities (N, classes) from logits, in float64."""
    return torch.softmax(torch.from_numpy(np.asarray(logits, dtype=np.float64)), dim=1).numpy()
