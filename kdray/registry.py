"""The MLflow Model Registry: kdray models registered by name and alias.

A registered version points at a run's ``model/`` artifact folder, an MLflow pyfunc model made
from code (:mod:`kdray.mlflow_model`): ``mlflow.pyfunc.load_model("models:/kdray-<dataset>@champion")``
and ``mlflow models predict`` work on it (images in, class probabilities out). Its
``artifacts/kdray_model/`` holds kdray's own files (``model.safetensors`` + ``model.json`` and the
SHAP background), which :func:`load_registered` rebuilds with :func:`kdray.models.load_model`
for the explanation path — no pickle, no torch.export graph anywhere.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, Schema, TensorSpec
from torch import nn

from kdray.data.mlflow_inputs import trained_on
from kdray.data.record import DataRecord, load_record
from kdray.data.specs import DATASETS, get_spec
from kdray.models import SPEC_FILE, ModelSpec, load_model

__all__ = [
    "RegisteredModel",
    "fetch_registered",
    "load_registered",
    "log_model_folder",
    "register_model",
    "registered_name",
]

ARTIFACT_PATH = "model"
PYFUNC_CODE = Path(__file__).with_name("mlflow_model.py")
KDRAY_FILES = Path("artifacts") / "kdray_model"  # kdray's files inside the pyfunc model folder


def _signature(spec: ModelSpec) -> ModelSignature:
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
        outputs=Schema([ColSpec(DataType.float, name) for name in spec.class_names]),
    )


def log_model_folder(client: MlflowClient, run_id: str, folder: str | Path) -> None:
    """Log a saved kdray model folder as the run's ``model/``: an MLflow pyfunc from code.

    The pyfunc keeps the folder's files as its ``kdray_model`` artifact (with ``data.json``, the
    model's data record), with a signature (uint8 RGB images (N, H, W, 3) in, one probability
    column per class out), the record's public form as MLmodel metadata ``kdray.data``, and the
    running environment's versions of the packages it needs.
    """
    import mlflow.pyfunc

    folder = Path(folder)
    spec = ModelSpec.from_dict(json.loads((folder / SPEC_FILE).read_text()))
    record = load_record(folder)
    metadata: dict[str, Any] = {"kdray.kind": spec.kind, "kdray.dataset": spec.dataset or ""}
    if record is not None:  # what the model saw, on its MLmodel page (public form: no paths)
        metadata["kdray.data"] = record.public()
    with tempfile.TemporaryDirectory() as tmp:
        # MLflow keeps an artifact under its folder's own name: name it what the loader reads.
        files = shutil.copytree(folder, Path(tmp) / KDRAY_FILES.name)
        out = Path(tmp) / ARTIFACT_PATH
        example = np.zeros((1, spec.image_size, spec.image_size, 3), dtype=np.uint8)
        with warnings.catch_warnings():  # MLflow's advice on type hints, for an explicit signature
            warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow\.")
            mlflow.pyfunc.save_model(
                path=str(out),
                python_model=str(PYFUNC_CODE),
                artifacts={"kdray_model": str(files)},
                signature=_signature(spec),
                input_example=example,
                pip_requirements=_requirements(),
                metadata=metadata,
            )
        client.log_artifacts(run_id, str(out), ARTIFACT_PATH)


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for package in (
        "kdray",
        "torch",
        "torchvision",
        "safetensors",
        "numpy",
        "pandas",
        "pillow",
        "mlflow",
    ):
        try:
            out.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            out.append(package)
    return out


def registered_name(dataset: str, teacher: bool = False) -> str:
    """``kdray-<dataset>`` for the champion student, ``kdray-<dataset>-teacher`` for the teacher."""
    return f"kdray-{dataset}-teacher" if teacher else f"kdray-{dataset}"


def register_model(
    client: MlflowClient, name: str, run_id: str, alias: str, tags: dict[str, str] | None = None
) -> str:
    """Register the run's ``model/`` artifacts as a version of ``name`` and point ``alias`` at it.

    Idempotent per run: a run that already has a version of ``name`` (a stage redone after the
    driver was killed between registering and finishing) keeps that version; no second one.

    Returns:
        The version number.
    """
    try:
        client.create_registered_model(
            name, description="kdray model: model.safetensors + model.json"
        )
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if existing:
        version = min(existing, key=lambda v: int(v.version))
    else:
        source = f"{client.get_run(run_id).info.artifact_uri}/{ARTIFACT_PATH}"
        version = client.create_model_version(name, source, run_id=run_id, tags=tags or {})
    client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


@dataclass
class RegisteredModel:
    """A registered version copied to local disk, with what a server shows about it.

    Attributes:
        directory: local ``model.safetensors`` + ``model.json`` (+ ``explain_background.npz``
            when the version has a SHAP background).
        metrics: the registering run's metrics (``test_accuracy``, ``params``, ``flops``, ...).
    """

    name: str
    alias: str
    version: str
    run_id: str
    directory: Path
    spec: ModelSpec
    metrics: dict[str, float] = field(default_factory=dict)
    # The data the model trained on, from its own record (or, for a version registered before
    # records, its run's inputs): what a model card says, not the dataset catalogue's description
    # of the public dataset. ``{"synthetic", "images", "source", "text"}``; public (no paths).
    trained_on: dict[str, Any] = field(default_factory=dict)
    # What the model saw (kdray.data.record: ``data.json`` beside its weights); None for a
    # version registered before kdray wrote records.
    record: DataRecord | None = None


def fetch_registered(
    name: str,
    alias: str,
    dest: str | Path,
    tracking_uri: str | None = None,
    version: str | None = None,
) -> RegisteredModel:
    """Download ``name@alias`` into ``dest`` (a new folder) and read its spec and run metrics.

    ``version`` pins a version number instead (``alias`` is then only recorded): what workers
    that load a model the driver resolved use, so a moved alias cannot split them.

    Raises:
        MlflowException: no such model, alias or version, or the tracking store is unreachable.
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    found = (
        client.get_model_version(name, version)
        if version is not None
        else client.get_model_version_by_alias(name, alias)
    )
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    local = Path(client.download_artifacts(found.run_id, ARTIFACT_PATH, str(dest)))
    if (local / KDRAY_FILES / SPEC_FILE).is_file():  # a pyfunc model folder; older: the files
        local = local / KDRAY_FILES
    spec = ModelSpec.from_dict(json.loads((local / SPEC_FILE).read_text()))
    run = client.get_run(found.run_id)
    task = get_spec(spec.dataset).title.split(" (")[0] if spec.dataset in DATASETS else name
    record = load_record(local)
    if record is not None:
        trained = {
            "synthetic": record.source.synthetic,
            "images": record.train_images,
            "source": record.source.label,
            "text": record.trained_on(task),
        }
    else:
        trained = trained_on(run.inputs.dataset_inputs, task)
    return RegisteredModel(
        name,
        alias,
        str(found.version),
        found.run_id,
        local,
        spec,
        dict(run.data.metrics),
        trained,
        record,
    )


def load_registered(
    name: str, alias: str = "champion", tracking_uri: str | None = None, device: str = "cpu"
) -> tuple[nn.Module, ModelSpec]:
    """Load ``name@alias`` (e.g. ``kdray-brain_tumor@champion``) as a torch module in eval mode.

    Raises:
        MlflowException: no such model or alias.
    """
    with tempfile.TemporaryDirectory() as tmp:
        return load_model(fetch_registered(name, alias, tmp, tracking_uri).directory, device=device)
