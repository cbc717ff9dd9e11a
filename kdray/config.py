"""The experiment's configuration: pydantic models loaded from YAML, with ``--set`` overrides.

Every section is strict: an unknown key, a wrong type or a value out of range fails at load time
with a :class:`ConfigError` that names the key path (``kd.alpha``), before any work starts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kdray.data.specs import DATASETS

__all__ = [
    "max_student_depth",
    "widths_for",
    "AugmentConfig",
    "ConfigError",
    "DataConfig",
    "ExplainConfig",
    "ExperimentConfig",
    "KDConfig",
    "MLflowConfig",
    "RayConfig",
    "StudentConfig",
    "StrictModel",
    "SyntheticConfig",
    "TeacherConfig",
    "TransparencyConfig",
    "TuneConfig",
    "apply_overrides",
    "load_config",
    "validate_config",
]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key path."""


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, and so is an assignment of the wrong type."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticConfig(StrictModel):
    """The synthetic stand-in written for every dataset that has no ``data.roots`` entry."""

    n_per_class: int = Field(300, ge=4, description="images per class, all splits together")
    size: int = Field(96, ge=16, le=1024, description="side of the generated PNG files")
    seed: int = 0
    student_fraction: float = Field(
        0.25,
        gt=0.0,
        le=1.0,
        description="share of each class of a synthetic training split that the students (KD "
        "trials, champion and CE-only baseline alike) train on; the teacher trains on all of it. "
        "It stands in for the ImageNet pretraining of the paper's teacher, which a synthetic task "
        "cannot have: the teacher knows more of the task than the student sees. Datasets with a "
        "data.roots entry always give the students the whole training split",
    )


class DataConfig(StrictModel):
    datasets: list[str] = Field(default_factory=lambda: list(DATASETS))
    roots: dict[str, str] = Field(
        default_factory=dict,
        description="dataset id -> folder of a real copy; datasets not listed use synthetic data",
    )
    masks_roots: dict[str, str] = Field(
        default_factory=dict,
        description="dataset id -> folder mirroring the root with lesion masks (same relative "
        "paths, any image format, white = lesion; images without one are fine)",
    )
    image_size: int = Field(64, ge=16, le=1024, description="model input side; images are resized")
    val_fraction: float = Field(0.15, gt=0.0, lt=0.5)
    test_fraction: float = Field(
        0.15, gt=0.0, lt=0.5, description="used only when the dataset has no test folder"
    )
    split_seed: int = 0
    skip_unreadable: bool = Field(
        False,
        description="leave out image files that do not decode (listed in the manifest and logged) "
        "instead of failing with the list of them",
    )
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)

    @field_validator("datasets")
    @classmethod
    def _known_datasets(cls, value: list[str]) -> list[str]:
        unknown = [d for d in value if d not in DATASETS]
        if unknown:
            raise ValueError(f"unknown dataset(s) {unknown}; expected ids from {sorted(DATASETS)}")
        if not value:
            raise ValueError("at least one dataset is needed")
        if len(set(value)) != len(value):
            raise ValueError(f"duplicate dataset ids in {value}")
        return value

    @field_validator("roots", "masks_roots")
    @classmethod
    def _known_root_ids(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = [d for d in value if d not in DATASETS]
        if unknown:
            raise ValueError(
                f"unknown dataset id(s) {unknown}; expected ids from {sorted(DATASETS)}"
            )
        return value

    def student_fraction(self, dataset_id: str) -> float:
        """The share of ``dataset_id``'s training split the students train on: the synthetic
        stand-in's ``synthetic.student_fraction``, all of a real dataset's."""
        return 1.0 if dataset_id in self.roots else self.synthetic.student_fraction


class AugmentConfig(StrictModel):
    """Teacher training augmentation (training split only)."""

    enabled: bool = True
    rotation: float = Field(10.0, ge=0.0, le=180.0, description="max degrees either way")
    shift: float = Field(0.05, ge=0.0, lt=0.5, description="max shift, fraction of the side")
    zoom: float = Field(0.1, ge=0.0, lt=1.0, description="scale drawn from [1 - zoom, 1 + zoom]")
    hflip: bool = True
    vflip: bool = False


class TeacherConfig(StrictModel):
    """DenseNet121 teacher, trained data-parallel with Ray Train."""

    arch: Literal["densenet121"] = "densenet121"
    weights: str | None = Field(
        None,
        description="None: random init; 'imagenet': torchvision download (needs internet); "
        "else a local .pth/.safetensors state_dict (ImageNet init, classifier replaced)",
    )
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1, description="effective (global) batch, split over workers")
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    early_stopping_patience: int = Field(0, ge=0, description="0 disables early stopping")
    schedule: Literal["plateau", "cosine"] = Field(
        "plateau",
        description="lr schedule: plateau halves lr after 2 epochs without a lower "
        "validation loss; cosine anneals lr to 0 over the epochs",
    )
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP ranks)")
    cpus_per_worker: int = Field(2, ge=1)
    use_gpu: bool = False
    amp: bool = Field(
        True,
        description="mixed-precision training: float16 with loss scaling on a GPU, bfloat16 "
        "on a CPU with AMX (Intel Sapphire Rapids and newer; a step in 0.58x the fp32 time), fp32 on other "
        "CPUs; validation and the cached logits are fp32 either way",
    )
    max_failures: int = Field(0, ge=-1, description="worker-failure restarts; -1 = unlimited")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)


def max_student_depth(image_size: int) -> int:
    """The most student blocks an image of ``image_size`` allows (each block max-pools by 2)."""
    return int(math.floor(math.log2(image_size)))


def widths_for(base: int, growth: float, depth: int) -> list[int]:
    """Block widths ``round(base * growth**min(i, 3))``: 16-32-64-128-128 for base 16, growth 2."""
    return [max(1, round(base * growth ** min(i, 3))) for i in range(depth)]


class StudentConfig(StrictModel):
    """Shallow CNN student: ``depth`` blocks of conv-BN-ReLU-pool, global pooling, linear head."""

    depth: int = Field(5, ge=1, le=8)
    base_width: int = Field(16, ge=1, description="width of block 1")
    growth: float = Field(2.0, ge=1.0, le=4.0, description="width factor per block, for 3 blocks")
    widths: list[int] | None = Field(
        None, description="explicit width per block; overrides base_width/growth and the sweep's"
    )
    epochs: int = Field(12, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(3e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)

    @model_validator(mode="after")
    def _widths_match_depth(self) -> StudentConfig:
        if self.widths is not None:
            if len(self.widths) != self.depth:
                raise ValueError(f"widths has {len(self.widths)} entries but depth is {self.depth}")
            if min(self.widths) < 1:
                raise ValueError("every width must be >= 1")
        return self

    def resolved_widths(self) -> list[int]:
        """The explicit ``widths``, else :func:`widths_for` on base_width, growth and depth."""
        if self.widths is not None:
            return list(self.widths)
        return widths_for(self.base_width, self.growth, self.depth)


class KDConfig(StrictModel):
    """Distillation loss: alpha * CE + (1 - alpha) * T^2 * KL(teacher/T || student/T)."""

    alpha: float = Field(0.5, ge=0.0, le=1.0)
    temperature: float = Field(4.0, gt=0.0)
    teacher_logits: Literal["cache", "live"] = Field(
        "cache", description="cache: trials read the teacher's stored logits; live: run the teacher"
    )


class TuneConfig(StrictModel):
    """The Ray Tune search, per dataset: alpha, temperature, student width and depth, lr.

    The width and depth dimensions apply unless ``student.widths`` is set explicitly.
    """

    num_samples: int = Field(24, ge=1, description="KD trials per dataset (and CE baseline trials)")
    max_concurrent_trials: int = Field(2, ge=1)
    cpus_per_trial: float = Field(1.0, gt=0.0)
    gpus_per_trial: float = Field(0.0, ge=0.0)
    reuse_actors: bool = Field(
        True, description="trials run one after another in the same Ray actors (no restart)"
    )
    search: Literal["optuna", "random"] = Field("optuna", description="optuna: TPE sampler")
    startup_trials: int = Field(
        8, ge=0, description="optuna: random trials (the seed point included) before TPE models"
    )
    scheduler: Literal["asha", "none"] = Field("asha", description="asha: early-stop weak trials")
    grace_period: int = Field(4, ge=1, description="ASHA: epochs before a trial can be stopped")
    reduction_factor: float = Field(3.0, gt=1.0, description="ASHA: 1/rf of trials go on per rung")
    alpha: tuple[float, float] = (0.05, 0.95)
    temperature: tuple[float, float] = (1.0, 20.0)
    base_width: list[int] = Field(default_factory=lambda: [8, 16, 24])
    growth: list[float] = Field(default_factory=lambda: [1.5, 2.0])
    depth: list[int] = Field(default_factory=lambda: [4, 5, 6])
    lr: tuple[float, float] = (1e-3, 1e-2)
    champion: Literal["transparent", "accuracy"] = Field(
        "transparent",
        description="the champion rule: transparent: among trials within selection_tolerance of "
        "the best val accuracy, the best transparency score, then the fewest FLOPs (the search "
        "is then multi-objective: TPE and ASHA over accuracy and transparency); accuracy: the "
        "fewest FLOPs within selection_tolerance of the best val accuracy (transparency scored "
        "and reported, not searched or selected on)",
    )
    selection_tolerance: float = Field(
        0.01,
        ge=0.0,
        le=1.0,
        description="champion: the val accuracy band below the best that the rule chooses in",
    )
    max_failures: int = Field(1, ge=-1, description="retries of a failed trial; -1 = unlimited")
    seed: int = 0

    @field_validator("alpha")
    @classmethod
    def _alpha_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        lo, hi = value
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"alpha range must satisfy 0 <= low <= high <= 1, got {list(value)}")
        return value

    @field_validator("temperature", "lr")
    @classmethod
    def _positive_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        lo, hi = value
        if not 0.0 < lo <= hi:
            raise ValueError(f"range must satisfy 0 < low <= high, got {list(value)}")
        return value

    @field_validator("base_width", "depth", "growth")
    @classmethod
    def _choices(cls, value: list) -> list:
        if not value or min(value) < 1:
            raise ValueError("needs at least one choice, each >= 1")
        return value


CamMethodName = Literal["gradcam", "hirescam", "layercam", "gradcampp", "xgradcam"]


class ExplainConfig(StrictModel):
    """Explanations (feature maps, class activation maps, SHAP) and the transparency report."""

    methods: list[Literal["feature_maps", "gradcam", "shap"]] = Field(
        default_factory=lambda: ["feature_maps", "gradcam", "shap"]
    )
    cam_method: CamMethodName = Field(
        "hirescam",
        description="the class activation map every model is scored, selected and explained "
        "with (the 'gradcam' method's variant): hirescam (default, chosen by measurement: see "
        "docs/transparency.md), gradcam (the paper's Grad-CAM), layercam, gradcampp, xgradcam",
    )
    student_layer: str | None = Field(
        None,
        description="CAM layer; None: the layer chosen by measurement when the model was "
        "trained (its cam.json), else the deepest block with >= 7x7 output",
    )
    teacher_layer: str | None = Field(
        None,
        description="CAM layer; None: chosen by measurement (cam.json), else the deepest dense "
        "block with >= 7x7 output",
    )
    top_k_channels: int | None = Field(
        None, ge=1, description="feature maps: mean of the top-k channels"
    )
    shap_background: int = Field(
        16, ge=1, description="stratified training images kept as background"
    )
    shap_nsamples: int = Field(50, ge=1)
    report: bool = Field(True, description="write the transparency report at the end of a run")
    report_images: int = Field(16, ge=1, description="test images scored per dataset in the report")
    timing_images: int = Field(4, ge=1, description="images timed for the mean execution time")
    grid_examples: int = Field(4, ge=1, description="example rows in the report's figure grid")
    sanity: bool = Field(
        True,
        description="sanity checks in the report: model parameter randomisation and random logit",
    )
    sanity_images: int = Field(
        8, ge=1, description="scored images the sanity checks explain (feature maps, Grad-CAM)"
    )
    sanity_shap_images: int = Field(
        2, ge=1, description="of those, images SHAP explains (it costs shap_nsamples passes each)"
    )


class TransparencyConfig(StrictModel):
    """The transparency score every model gets (KD and CE-only trials, champions, teachers):
    see kdray/explain/scoring.py and docs/transparency.md."""

    images: int = Field(
        96, ge=4, description="validation images scored per model (class-stratified, seeded)"
    )
    basis: Literal["auto", "localisation", "faithfulness"] = Field(
        "auto",
        description="localisation: mean of pointing game and energy in the lesion masks; "
        "faithfulness: (1 + insertion - deletion) / 2 of the map's pixel ranking; auto: "
        "localisation where at least 8 scored images have a mask, else faithfulness. A blank map "
        "scores 0 either way",
    )
    min_layer_side: int = Field(
        4, ge=1, description="candidate layers: blocks whose output is at least this many px a side"
    )
    sanity_images: int = Field(
        16,
        ge=0,
        description="images of the randomisation check: a layer whose maps survive "
        "re-initialising the model (|rho| >= 0.5) is not chosen (0: no check)",
    )
    faithfulness_images: int = Field(
        32, ge=1, description="faithfulness basis: images deletion / insertion run on"
    )
    deletion_steps: int = Field(8, ge=2, description="faithfulness basis: curve steps")


class ExportConfig(StrictModel):
    """The champion's ONNX copy (``kdray.edge``): exported at the end of each dataset's run."""

    onnx: bool = Field(
        True,
        description="export the champion to ONNX (explain + predict graphs), parity-checked "
        "against torch, logged as the onnx/ artifact of its registered version",
    )
    parity_images: int = Field(64, ge=1, description="test images the parity check runs on")


class MLflowConfig(StrictModel):
    experiment: str = "kdray"
    tracking_uri: str | None = Field(
        None, description="None: $MLFLOW_TRACKING_URI, else SQLite in the workspace"
    )


class RayConfig(StrictModel):
    address: str | None = Field(None, description="None: $RAY_ADDRESS, else a new local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray (None: all)")
    storage_path: str | None = Field(None, description="Ray results; None: <workspace>/ray_results")
    temp_dir: str | None = Field(
        None, description="temp dir of the local Ray kdray starts; None: /tmp/kdray-ray-<uid>"
    )
    max_concurrent_datasets: int = Field(
        1,
        ge=1,
        description="datasets whose pipelines (teacher, sweep, champion, report) run at "
        "once; 1 on a laptop, up to the number of datasets on a cluster with room for their sweeps",
    )


class ExperimentConfig(StrictModel):
    seed: int = 0
    seeds: list[int] = Field(
        default_factory=lambda: [0, 1, 2],
        description="champion and CE baseline on each seed: mean and std, paired KD-gain test "
        "([]: one seed, no uncertainty)",
    )
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    kd: KDConfig = Field(default_factory=KDConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    explain: ExplainConfig = Field(default_factory=ExplainConfig)
    transparency: TransparencyConfig = Field(default_factory=TransparencyConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    mlflow: MLflowConfig = Field(default_factory=MLflowConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _student_fits_the_image(self) -> ExperimentConfig:
        # Every student block max-pools by 2: more blocks than log2(image_size) pool to nothing.
        deepest = max_student_depth(self.data.image_size)
        if self.student.depth > deepest:
            raise ValueError(
                f"student.depth: {self.student.depth} blocks is too deep for data.image_size "
                f"{self.data.image_size} (each block halves the image; at most {deepest})"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe nested dict (what is logged to MLflow as the resolved config)."""
        return json.loads(self.model_dump_json())


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for item in err.errors():
        key = ".".join(str(part) for part in item["loc"]) or "<root>"
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown key"
        got = item.get("input")
        shown = (
            "" if item["type"] == "extra_forbidden" or isinstance(got, dict) else f" (got {got!r})"
        )
        lines.append(f"  {key}: {msg}{shown}")
    return "\n".join(lines)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides; values are parsed as YAML (``0.5``, ``[a, b]``, ``null``).

    Raises:
        ConfigError: an override without ``=`` or one that descends into a non-mapping.
    """
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key.path=value, got {item!r}")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: value {text!r} is not valid YAML: {exc}") from None
        node = raw
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(f"--set {key}: {where} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return raw


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> ExperimentConfig:
    """Load and validate a YAML config (default: ``configs/default.yaml``) with overrides.

    Raises:
        ConfigError: unreadable file, invalid YAML, unknown key, wrong type or out-of-range value;
            the message names every offending key path.
    """
    source = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        text = source.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {source}: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {source} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {source} must be a mapping at the top level")
    return validate_config(apply_overrides(raw, overrides or []), str(source))


def validate_config(raw: dict[str, Any], source: str) -> ExperimentConfig:
    """Validate a config mapping (a file's, a run's logged ``config.yaml``) named ``source``.

    Raises:
        ConfigError: naming every offending key path.
    """
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None
