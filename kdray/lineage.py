"""From a registered model back to the run and the data that made it: the post-run commands'
config.

``tune/audit.py`` and ``tune/export.py`` work on one registered version (``kdray-<dataset>@alias``);
what data they read is the model's, never whatever config is at hand:

* with no ``--config`` they take the config of the run that registered the version (its
  ``config.yaml`` artifact), ``--set`` applied on top; where things run and log (``mlflow``,
  ``ray``) stays the invocation's own (the default config, ``--set``, ``--address``);
* a ``--config`` or ``--set`` that would give the model other data than it saw (another input
  size, another source, another split) stops the command before any work, naming each key with
  both values and the way out (:class:`LineageError`);
* once the manifest is built, its split digest must be the one the model recorded
  (:func:`check_manifest`): a real folder that changed, or a copy that is not the same files,
  is refused too.

The model's record is ``data.json`` in its registered files (:mod:`kdray.data.record`); a version
registered before kdray wrote records has it rebuilt from its run's config (no digest to check).
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from mlflow import MlflowClient

from kdray.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    load_config,
    validate_config,
)
from kdray.data.record import RECORD_FILE, DataRecord, load_record, split_digest
from kdray.data.specs import get_spec
from kdray.registry import ARTIFACT_PATH, KDRAY_FILES, registered_name
from kdray.tracking import resolve_tracking_uri
from kdray.workspace import Workspace

__all__ = [
    "Lineage",
    "LineageError",
    "check_manifest",
    "contradiction_message",
    "model_lineage",
    "post_run_config",
    "run_config",
]

CONFIG_ARTIFACT = "config.yaml"  # kdray.tracking.Tracker.log_config


class LineageError(ValueError):
    """A command asked a model to work on data it was not trained on; the message says which
    keys differ, both values, and how to resolve it."""


@dataclass
class Lineage:
    """A registered version, the run that registered it, and what it was trained on."""

    name: str
    alias: str
    version: str
    run_id: str
    record: DataRecord
    run_config: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version} (@{self.alias})"


def run_config(client: MlflowClient, run_id: str) -> dict[str, Any]:
    """The config a run logged (``config.yaml``), as a dict; empty if it logged none."""
    names = {Path(f.path).name for f in client.list_artifacts(run_id)}
    if CONFIG_ARTIFACT not in names:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, CONFIG_ARTIFACT, tmp)
        return yaml.safe_load(Path(path).read_text()) or {}


def _logged_record(client: MlflowClient, run_id: str) -> DataRecord | None:
    folder = f"{ARTIFACT_PATH}/{KDRAY_FILES.as_posix()}"
    names = {Path(f.path).name for f in client.list_artifacts(run_id, folder)}
    if RECORD_FILE not in names:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, f"{folder}/{RECORD_FILE}", tmp)
        return load_record(Path(path).parent)


def model_lineage(name: str, alias: str, tracking_uri: str, version: str | None = None) -> Lineage:
    """Look up ``name@alias`` (or ``version``): its run's config and its data record.

    Raises:
        MlflowException: no such model, alias or version; the store is unreachable.
        LineageError: the version has neither a record nor a run config to rebuild one from.
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    found = (
        client.get_model_version(name, version)
        if version is not None
        else client.get_model_version_by_alias(name, alias)
    )
    config = run_config(client, found.run_id)
    record = _logged_record(client, found.run_id)
    if record is None:  # registered before kdray wrote records: what its run's config says
        dataset = client.get_run(found.run_id).data.tags.get("kdray.dataset", "")
        if not config or not dataset:
            raise LineageError(
                f"{name} v{found.version}: its run {found.run_id} logged neither a data record "
                "nor a config; give the run's config with --config"
            )
        try:
            data_cfg = validate_config(config, f"the config.yaml of run {found.run_id}").data
        except ConfigError as exc:
            raise LineageError(
                f"{name} v{found.version}: {exc}; give a config with --config"
            ) from None
        record = DataRecord.from_config(data_cfg, dataset, list(get_spec(dataset).classes))
    return Lineage(name, alias, str(found.version), found.run_id, record, config)


def contradiction_message(
    lineage: Lineage, problems: list[tuple[str, Any, Any]], given: str, way_out: str = ""
) -> str:
    """The one message for a config that would give a model other data than it saw."""
    r = lineage.record
    lines = [
        f"{lineage.label} was trained on the {r.describe()} at {r.image_size}x{r.image_size} px, "
        f"but {given} gives it other data:"
    ]
    lines += [f"  {key}: {theirs!r} (the model's: {ours!r})" for key, ours, theirs in problems]
    drop = "--config" if given.startswith("--config") else "those --set keys"
    hint = (
        f"leave out {drop} (the command then takes the config of the run that trained the "
        f"model, run {lineage.run_id[:8]}) or set these keys to the model's values"
    )
    lines.append(hint + (f"; {way_out}" if way_out else ""))
    return "\n".join(lines)


def post_run_config(
    config: str | None,
    overrides: list[str],
    ws: Workspace,
    dataset: str,
    alias: str,
    *,
    check_data: bool = True,
    way_out: str = "",
) -> tuple[ExperimentConfig, Lineage]:
    """The config a post-run command uses for ``kdray-<dataset>@alias``, and the model's lineage.

    Args:
        config: ``--config``; None: the registering run's own config.
        overrides: ``--set`` (and ``--address``) items.
        check_data: refuse a config that gives the model other data (off when the command
            reads a folder of the user's instead of the run's split, e.g. ``audit --root``).
        way_out: another way to resolve a contradiction, named in the message.

    Raises:
        ConfigError: a bad ``--config`` / ``--set``, or a run config that no longer loads.
        MlflowException: no such model or alias; the tracking store is unreachable.
        LineageError: the config contradicts the model's data (with check_data).
    """
    given = load_config(config, overrides)  # where to look, and the user's settings
    lineage = model_lineage(registered_name(dataset), alias, resolve_tracking_uri(given.mlflow, ws))
    if config is None and lineage.run_config:
        raw = apply_overrides(copy.deepcopy(lineage.run_config), overrides)
        # Where this command runs and logs is the invocation's, not the training run's.
        raw["mlflow"], raw["ray"] = given.mlflow.model_dump(), given.ray.model_dump()
        cfg = validate_config(
            raw, f"the config.yaml of run {lineage.run_id}, which registered {lineage.label}"
        )
    else:
        cfg = given
    if check_data:
        problems = lineage.record.contradictions(cfg.data)
        if problems:
            source = f"--config {config}" if config else "--set"
            if config and overrides:
                source += " with --set"
            raise LineageError(contradiction_message(lineage, problems, source, way_out))
    return cfg, lineage


def check_manifest(manifest: Any, lineage: Lineage) -> None:
    """The split a command is about to read must be the one the model recorded.

    Raises:
        LineageError: other files, labels or split (the digests differ).
    """
    ours = lineage.record.digest
    if not ours:  # a version registered before records: nothing to compare
        return
    theirs = split_digest(manifest)
    if theirs != ours:
        raise LineageError(
            f"the {lineage.record.dataset} files and split under {manifest.root} are not those "
            f"{lineage.label} was trained on (split digest {theirs}, the model's {ours}): "
            "files were added, removed or relabelled since. Audit them as a folder with "
            "--root, or point data.roots at the copy the model was trained on"
        )
