"""Class activation maps through pytorch-grad-cam, batched, with hooks that never outlive a call.

:func:`grad_cam` runs any variant of :mod:`kdray.explain.cam_methods` (Grad-CAM, the paper's, by
default; HiResCAM, LayerCAM, Grad-CAM++, XGrad-CAM) with pytorch-grad-cam's own classes.
:func:`layer_cams` computes one variant at several layers from a single forward and backward pass
(what scoring a model's layers costs once per trial); the tests hold it to :func:`grad_cam`.

pytorch-grad-cam registers its hooks on the target layer of the shared model, so two threads
explaining one model at once would read each other's activations: each call holds the model's
lock. ``GradCAM.__exit__`` swallows ``IndexError`` (and returns nothing); the call re-raises it as
:class:`ExplainError` so a bad target never passes silently.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from kdray.config import ExplainConfig
from kdray.explain.cam_methods import PAPER_METHOD, combine, reference_class, scale_to_input
from kdray.explain.hooks import capture_outputs, eval_mode, grads_only_for, model_lock
from kdray.explain.inputs import ImageLike, to_batch

__all__ = [
    "MIN_CAM_SIDE",
    "Cam",
    "CamMaps",
    "ExplainError",
    "cam_layer",
    "default_cam_layer",
    "grad_cam",
    "layer_cams",
    "layer_output_size",
    "resolve_cam",
]


class ExplainError(RuntimeError):
    """An explanation could not be computed (bad target, layer or input)."""


@dataclass
class CamMaps:
    """Grad-CAM maps of a batch.

    Attributes:
        layer: the target layer's name.
        maps: float32 (N, H, W) in [0, 1] at input size (pytorch-grad-cam's min-max scaling).
        targets: int64 (N,) class explained per image.
        logits: float32 (N, classes) from the same forward pass.
    """

    layer: str
    maps: np.ndarray
    targets: np.ndarray
    logits: np.ndarray


MIN_CAM_SIDE = 7  # the last block's output at 224 px in both models (and in the Grad-CAM paper)
_SIZES: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, int], tuple[int, int]]] = (
    weakref.WeakKeyDictionary()
)


def layer_output_size(model: nn.Module, layer: str, image_size: int) -> tuple[int, int]:
    """(H, W) of ``layer``'s output for an image_size x image_size input (cached per model)."""
    sizes = _SIZES.setdefault(model, {})
    if (layer, image_size) not in sizes:
        names = [n for n in getattr(model, "block_names", []) if n != layer] + [layer]
        with (
            model_lock(model),
            eval_mode(model),
            torch.no_grad(),
            capture_outputs(model, names) as out,
        ):
            model(torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device))
        for name in names:
            sizes[(name, image_size)] = (int(out[name].shape[-2]), int(out[name].shape[-1]))
    return sizes[(layer, image_size)]


def default_cam_layer(
    model: nn.Module, image_size: int | None = None, min_side: int = MIN_CAM_SIDE
) -> str:
    """The block Grad-CAM reads when none is named.

    With ``image_size``: the deepest block whose output is at least ``min_side`` pixels a side
    (at 224 px the last block of both models; at 64 px the student's ``block3`` and the
    teacher's ``denseblock2``: a 2x2 last block would only point at a corner), or the first
    block if none is. Without: the last block.

    Raises:
        ValueError: the model has no ``block_names``; pass a layer explicitly.
    """
    names = getattr(model, "block_names", None)
    if not names:
        raise ValueError(f"{type(model).__name__} has no block_names; pass layer=... explicitly")
    if image_size is None:
        return names[-1]
    fitting = [n for n in names if min(layer_output_size(model, n, image_size)) >= min_side]
    return fitting[-1] if fitting else names[0]


def cam_layer(role: str, model: nn.Module, cfg: ExplainConfig, image_size: int) -> str:
    """The configured block for ``role`` (``teacher`` or ``student``), else
    :func:`default_cam_layer` at the input size (no measured choice: see :func:`resolve_cam`)."""
    chosen = cfg.teacher_layer if role == "teacher" else cfg.student_layer
    return chosen or default_cam_layer(model, image_size)


class Cam(NamedTuple):
    """A class activation map to compute: the variant (:mod:`kdray.explain.cam_methods`) and the
    layer it reads."""

    method: str
    layer: str


def resolve_cam(
    role: str,
    model: nn.Module,
    cfg: ExplainConfig,
    image_size: int,
    choice: tuple[str, str] | None = None,
) -> Cam:
    """The CAM the report, the audit and the server compute for ``role``'s model.

    A layer named in the config (``explain.student_layer`` / ``teacher_layer``) with
    ``explain.cam_method``; else the model's measured choice (``choice``: the variant and layer
    of its ``cam.json``, :mod:`kdray.explain.scoring`); else ``explain.cam_method`` at
    :func:`default_cam_layer`.
    """
    configured = cfg.teacher_layer if role == "teacher" else cfg.student_layer
    if configured:
        return Cam(cfg.cam_method, configured)
    if choice is not None:
        return Cam(*choice)
    return Cam(cfg.cam_method, default_cam_layer(model, image_size))


def _targets(targets: int | Sequence[int] | np.ndarray | None, n: int) -> np.ndarray | None:
    if targets is None:
        return None
    tgt = np.atleast_1d(np.asarray(targets, dtype=np.int64))
    tgt = np.repeat(tgt, n) if tgt.size == 1 else tgt
    if tgt.shape != (n,) or (tgt < 0).any():
        raise ValueError(f"need {n} non-negative class indices, got {tgt.tolist()}")
    return tgt


def grad_cam(
    model: nn.Module,
    images: ImageLike,
    layer: str | None = None,
    targets: int | Sequence[int] | np.ndarray | None = None,
    method: str = PAPER_METHOD,
) -> CamMaps:
    """A class activation map of a batch at one layer (Grad-CAM unless ``method`` says).

    Args:
        model: a kdray model; run in eval mode under its lock, left as it was found.
        images: see :func:`kdray.explain.inputs.to_batch`.
        layer: qualified layer name; default :func:`default_cam_layer` at the input size.
        targets: class per image (or one for all); None explains the predicted class.
        method: one of :data:`kdray.explain.cam_methods.CAM_METHODS`.

    Returns:
        :class:`CamMaps`.

    Raises:
        ValueError: targets that do not match the batch, or a negative class index.
        ExplainError: a target beyond the model's classes.
    """
    x = to_batch(images)
    name = layer or default_cam_layer(model, x.shape[-1])
    module = model.get_submodule(name)
    cam_class = reference_class(method)
    tgt = _targets(targets, x.shape[0])
    # pytorch-grad-cam (and the scikit-learn it imports: about 1.6 s) only where it runs: a
    # trial scores with layer_cams and a Ray Train worker never explains.
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam_targets = None if tgt is None else [ClassifierOutputTarget(int(c)) for c in tgt]
    # A layer without parameters gets its gradient through the input instead.
    has_params = any(True for _ in module.parameters())
    with (
        model_lock(model),
        eval_mode(model),
        torch.enable_grad(),
        grads_only_for(model, module if has_params else None),
        cam_class(model=model, target_layers=[module]) as cam,
    ):
        cam.compute_input_gradient = not has_params
        try:
            maps = cam(input_tensor=x, targets=cam_targets)
        except IndexError as exc:
            raise ExplainError(f"Grad-CAM failed at {name!r}: {exc}") from exc
        logits = cam.outputs.detach().float().cpu()
    picked = logits.argmax(1).numpy() if cam_targets is None else tgt
    return CamMaps(
        name, np.asarray(maps, dtype=np.float32), picked.astype(np.int64), logits.numpy()
    )


def layer_cams(
    model: nn.Module,
    images: ImageLike,
    layers: Sequence[str],
    method: str = PAPER_METHOD,
    targets: int | Sequence[int] | np.ndarray | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """One CAM variant at several layers from one forward and one backward pass.

    The maps equal :func:`grad_cam`'s at each layer (pytorch-grad-cam's combination and scaling,
    computed in torch); only the passes are shared.

    Args:
        model: a kdray model; run in eval mode under its lock, left as it was found.
        images: see :func:`kdray.explain.inputs.to_batch`.
        layers: qualified layer names.
        method: one of :data:`kdray.explain.cam_methods.CAM_METHODS`.
        targets: class per image (or one for all); None explains the predicted class.

    Returns:
        ``({layer: float32 (N, H, W) in [0, 1]}, targets int64 (N,), logits float32 (N, K))``.
    """
    x = to_batch(images)
    n, size = x.shape[0], (x.shape[-2], x.shape[-1])
    tgt = _targets(targets, n)
    outputs: dict[str, torch.Tensor] = {}
    handles = []

    def keep(name: str):
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            output.retain_grad()
            outputs[name] = output
            return output

        return hook

    with model_lock(model), eval_mode(model), torch.enable_grad():
        flags = [(p, p.requires_grad) for p in model.parameters()]
        try:
            for p, _ in flags:
                p.requires_grad_(False)  # gradients at the layers' outputs only
            for name in layers:
                handles.append(model.get_submodule(name).register_forward_hook(keep(name)))
            inp = x.clone().requires_grad_(True)  # a graph even with every parameter frozen
            logits = model(inp)
            picked = logits.argmax(1).detach() if tgt is None else torch.from_numpy(tgt)
            if int(picked.max()) >= logits.shape[1]:
                raise ExplainError(f"target {int(picked.max())} beyond {logits.shape[1]} classes")
            logits.gather(1, picked[:, None]).sum().backward()
            maps = {
                name: scale_to_input(combine(method, out.detach(), out.grad), size).numpy()
                for name, out in outputs.items()
            }
        finally:
            for h in handles:
                h.remove()
            for p, flag in flags:
                p.requires_grad_(flag)
    return (
        {name: maps[name].astype(np.float32) for name in layers},
        picked.numpy().astype(np.int64),
        logits.detach().float().numpy(),
    )
