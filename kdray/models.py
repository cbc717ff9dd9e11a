"""Teacher and student networks, built from one JSON-able spec, saved without pickle.

Both models take images as float tensors in [0, 1] (N, 3, H, W) and normalise inside, so
training, explanations and the server all feed the same thing. Every ReLU is non-inplace so
Grad-CAM and SHAP hooks can sit anywhere.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kdray.input_norm import InputNorm

__all__ = [
    "ModelSpec",
    "StudentCNN",
    "TeacherDenseNet",
    "build_model",
    "count_flops",
    "count_params",
    "load_model",
    "load_model_files",
    "model_files",
    "save_model",
]

if TYPE_CHECKING:
    from kdray.densenet import TeacherDenseNet


def __getattr__(name: str) -> Any:
    # The teacher's class needs torchvision (about 2 s to import, torch._dynamo included): loaded
    # when a teacher is built, not in every student trial's process.
    if name == "TeacherDenseNet":
        from kdray.densenet import TeacherDenseNet

        return TeacherDenseNet
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "model.json"


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model: stored next to its weights as ``model.json``."""

    kind: Literal["teacher", "student"]
    num_classes: int
    image_size: int
    class_names: list[str] = field(default_factory=list)
    arch: str = "densenet121"
    widths: list[int] = field(default_factory=list)
    dataset: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(**data)


def conv_block(in_ch: int, out_ch: int) -> nn.Sequential:
    """conv3x3 -> BN -> ReLU (not inplace) -> 2x2 max-pool."""
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, bias=False),
            bn=nn.BatchNorm2d(out_ch),
            relu=nn.ReLU(inplace=False),
            pool=nn.MaxPool2d(2),
        )
    )


class StudentCNN(nn.Module):
    """The shallow student: blocks ``features.block1`` .. ``features.block<depth>``, GAP, linear.

    Args:
        num_classes: output logits.
        widths: output channels per block (its length is the depth).
    """

    def __init__(self, num_classes: int, widths: list[int]) -> None:
        super().__init__()
        self.norm = InputNorm()
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        in_ch = 3
        for i, width in enumerate(widths, start=1):
            blocks[f"block{i}"] = conv_block(in_ch, width)
            in_ch = width
        self.features = nn.Sequential(blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(in_ch, num_classes)

    @property
    def block_names(self) -> list[str]:
        """Qualified names of the conv blocks, first to last (``features.block1``, ...)."""
        return [f"features.{name}" for name, _ in self.features.named_children()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.norm(x))
        return self.head(torch.flatten(self.pool(x), 1))


_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return state


def init_teacher_weights(model: TeacherDenseNet, weights: str | None) -> None:
    """Initialise the backbone from ImageNet weights; the classifier keeps its fresh init.

    Args:
        weights: None (random), ``imagenet`` (torchvision download; needs internet) or a path to
            a DenseNet121 state_dict (``.pth``/``.pt`` read with ``weights_only=True``, or
            ``.safetensors``).

    Raises:
        FileNotFoundError: the weights path does not exist.
        ValueError: the file is not a DenseNet121 state_dict.
    """
    if weights is None:
        return
    if weights == "imagenet":
        from torchvision.models import DenseNet121_Weights

        state = DenseNet121_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"teacher.weights: no such file {path}")
        state = _load_state_dict_file(path)
    # Old torchvision checkpoints name keys "denselayer1.norm.1"; current ones "norm1".
    state = {_OLD_DENSENET_KEY.sub(r"\1\2", k): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("classifier.", "norm."))]
    if missing or unexpected:
        raise ValueError(
            f"teacher.weights {weights!r} is not a DenseNet121 state_dict "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def build_model(spec: ModelSpec, teacher_weights: str | None = None) -> nn.Module:
    """The one place that turns a spec into a module (training, sweep, registry, server)."""
    if spec.kind == "teacher":
        if spec.arch != "densenet121":
            raise ValueError(f"unknown teacher arch {spec.arch!r}; expected 'densenet121'")
        from kdray.densenet import TeacherDenseNet

        model = TeacherDenseNet(spec.num_classes)
        init_teacher_weights(model, teacher_weights)
        return model
    if spec.kind == "student":
        if not spec.widths:
            raise ValueError("a student spec needs widths")
        return StudentCNN(spec.num_classes, spec.widths)
    raise ValueError(f"unknown model kind {spec.kind!r}; expected 'teacher' or 'student'")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class _NoModuleTracker:
    """Stands in for FlopCounterMode's module tracker: every count goes to "Global"."""

    parents = frozenset({"Global"})

    def __enter__(self) -> _NoModuleTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def flop_counter() -> Any:
    """``torch.utils.flop_counter.FlopCounterMode`` (total only) that is safe beside other threads.

    FlopCounterMode's module tracker installs process-wide module hooks, which attach gradient
    hooks to the outputs of every module that runs in any thread while it counts; an
    ``autograd.grad`` in another thread then fails ("A leaf node was passed to
    _will_engine_execute_node", seen with two datasets' reports at once). The counting itself
    is a dispatch mode, which is thread-local; without the tracker only the per-module
    breakdown, which kdray does not use, is lost.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _NoModuleTracker()
    return counter


def count_flops(model: nn.Module, image_size: int) -> int:
    """FLOPs of one forward pass on one (3, image_size, image_size) image.

    Counted by ``torch.utils.flop_counter`` (a multiply-add is 2 FLOPs), not by hand.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    counter = flop_counter()
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size, device=device))
    model.train(was_training)
    return int(counter.get_total_flops())


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / DataParallel wrappers."""
    return model.module if hasattr(model, "module") else model


def save_model(model: nn.Module, spec: ModelSpec, directory: str | Path) -> Path:
    """Write ``model.safetensors`` + ``model.json`` into ``directory`` (no pickle)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    (directory / SPEC_FILE).write_text(json.dumps(spec.to_dict(), indent=2))
    return directory


def load_model(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, ModelSpec]:
    """Rebuild a model saved by :func:`save_model`, in eval mode."""
    directory = Path(directory)
    spec = ModelSpec.from_dict(json.loads((directory / SPEC_FILE).read_text()))
    model = build_model(spec)
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE), device=str(device)))
    return model.to(device).eval(), spec


# Files a model folder may hold beside its weights: the CAM variant and layer measured for it
# (kdray.explain.scoring) and its data record (kdray.data.record).
OPTIONAL_FILES = ("cam.json", "data.json")


def model_files(directory: str | Path) -> dict[str, bytes]:
    """A model saved by :func:`save_model` as bytes (with the :data:`OPTIONAL_FILES` it has): it
    can travel through Ray's object store to workers on other nodes, which have no access to this
    machine's disk."""
    folder = Path(directory)
    names = (SPEC_FILE, WEIGHTS_FILE, *(n for n in OPTIONAL_FILES if (folder / n).is_file()))
    return {name: (folder / name).read_bytes() for name in names}


def load_model_files(
    files: dict[str, bytes], device: str | torch.device = "cpu"
) -> tuple[nn.Module, ModelSpec]:
    """:func:`load_model` from :func:`model_files`' bytes (no pickle: JSON and safetensors)."""
    from safetensors.torch import load as load_bytes

    spec = ModelSpec.from_dict(json.loads(files[SPEC_FILE]))
    model = build_model(spec)
    model.load_state_dict(load_bytes(files[WEIGHTS_FILE]))
    return model.to(device).eval(), spec
