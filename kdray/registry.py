"""The MLflow Model Registry: kdray models registered by name and alias, loaded with kdray's code.

A registered version points at a run's ``model/`` artifact folder (``model.safetensors`` +
``model.json``); loading downloads that folder and rebuilds the module with
:func:`kdray.models.load_model` — no pickle, no torch.export graph.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from torch import nn

from kdray.models import SPEC_FILE, ModelSpec, load_model

__all__ = ["RegisteredModel", "fetch_registered", "load_registered", "register_model",
           "registered_name"]

ARTIFACT_PATH = "model"


def registered_name(dataset: str, teacher: bool = False) -> str:
    """``kdray-<dataset>`` for the champion student, ``kdray-<dataset>-teacher`` for the teacher."""
    return f"kdray-{dataset}-teacher" if teacher else f"kdray-{dataset}"


def register_model(client: MlflowClient, name: str, run_id: str, alias: str,
                   tags: dict[str, str] | None = None) -> str:
    """Register the run's ``model/`` artifacts as a version of ``name`` and point ``alias`` at it.

    Idempotent per run: a run that already has a version of ``name`` (a stage redone after the
    driver was killed between registering and finishing) keeps that version; no second one.

    Returns:
        The version number.
    """
    try:
        client.create_registered_model(name, description="kdray model: model.safetensors + model.json")
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


def fetch_registered(name: str, alias: str, dest: str | Path,
                     tracking_uri: str | None = None) -> RegisteredModel:
    """Download ``name@alias`` into ``dest`` (a new folder) and read its spec and run metrics.

    Raises:
        MlflowException: no such model or alias, or the tracking store is unreachable.
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    version = client.get_model_version_by_alias(name, alias)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    local = Path(client.download_artifacts(version.run_id, ARTIFACT_PATH, str(dest)))
    spec = ModelSpec.from_dict(json.loads((local / SPEC_FILE).read_text()))
    metrics = dict(client.get_run(version.run_id).data.metrics)
    return RegisteredModel(name, alias, str(version.version), version.run_id, local, spec, metrics)


def load_registered(name: str, alias: str = "champion", tracking_uri: str | None = None,
                    device: str = "cpu") -> tuple[nn.Module, ModelSpec]:
    """Load ``name@alias`` (e.g. ``kdray-brain_tumor@champion``) as a torch module in eval mode.

    Raises:
        MlflowException: no such model or alias.
    """
    with tempfile.TemporaryDirectory() as tmp:
        return load_model(fetch_registered(name, alias, tmp, tracking_uri).directory, device=device)
