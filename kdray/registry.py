"""The MLflow Model Registry: kdray models registered by name and alias, loaded with kdray's code.

A registered version points at a run's ``model/`` artifact folder (``model.safetensors`` +
``model.json``); loading downloads that folder and rebuilds the module with
:func:`kdray.models.load_model` — no pickle, no torch.export graph.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from torch import nn

from kdray.models import ModelSpec, load_model

__all__ = ["load_registered", "register_model", "registered_name"]

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


def load_registered(name: str, alias: str = "champion", tracking_uri: str | None = None,
                    device: str = "cpu") -> tuple[nn.Module, ModelSpec]:
    """Load ``name@alias`` (e.g. ``kdray-brain_tumor@champion``) as a torch module in eval mode.

    Raises:
        MlflowException: no such model or alias.
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    version = client.get_model_version_by_alias(name, alias)
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(version.run_id, ARTIFACT_PATH, tmp)
        return load_model(Path(local), device=device)
