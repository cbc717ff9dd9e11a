"""The ONNX copy beside the registered student: logged to the champion's run, fetched by alias.

An export is the ``onnx/`` artifact folder of the run a model version was registered from, so
``kdray-<dataset>@champion`` names both the torch model (``model/``) and its edge copy; the
version carries the tag ``kdray.onnx`` once it has one.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from mlflow import MlflowClient

from kdray.config import ExplainConfig
from kdray.edge.export import CARD_FILE, EdgeExport, ExportError, export_student
from kdray.explain.scoring import load_cam_choice
from kdray.models import load_model
from kdray.registry import RegisteredModel, fetch_registered

__all__ = [
    "ONNX_ARTIFACT",
    "EdgeMissing",
    "export_registered",
    "fetch_edge",
    "has_edge",
    "log_edge",
]

ONNX_ARTIFACT = "onnx"
TAG = "kdray.onnx"


class EdgeMissing(LookupError):
    """The model version has no ONNX export (registered before exports, or its export failed)."""


def log_edge(client: MlflowClient, name: str, run_id: str, export: EdgeExport) -> None:
    """Log an export as ``onnx/`` of ``run_id`` and tag ``name``'s version from that run."""
    client.log_artifacts(run_id, str(export.directory), ONNX_ARTIFACT)
    parity = export.parity
    for key, value in (
        ("onnx.parity.logits", parity.logits),
        ("onnx.parity.feature_maps", parity.feature_maps),
        ("onnx.parity.gradcam", parity.gradcam),
        ("onnx.parity.near_tie_images", parity.near_tie_images),
        ("onnx.export_seconds", export.seconds),
    ):
        client.log_metric(run_id, key, value)
    for version in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        client.set_model_version_tag(name, version.version, TAG, f"{ONNX_ARTIFACT}/")


def has_edge(client: MlflowClient, name: str, version: str) -> bool:
    """Does ``name``'s ``version`` have an ONNX export yet (``onnx/model.json``)?"""
    run_id = client.get_model_version(name, version).run_id
    return CARD_FILE in {Path(f.path).name for f in client.list_artifacts(run_id, ONNX_ARTIFACT)}


def fetch_edge(
    name: str,
    alias: str,
    dest: str | Path,
    tracking_uri: str | None = None,
    version: str | None = None,
) -> tuple[Path, dict]:
    """Download ``name@alias``'s (or ``version``'s) ONNX export into ``dest``; returns its folder
    and card.

    Raises:
        MlflowException: no such model, alias or version, or the tracking store is unreachable.
        EdgeMissing: the version has no export (the message says how to make one).
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    version = (
        client.get_model_version(name, version)
        if version is not None
        else client.get_model_version_by_alias(name, alias)
    )
    listed = {Path(f.path).name for f in client.list_artifacts(version.run_id, ONNX_ARTIFACT)}
    if CARD_FILE not in listed:
        dataset = name.removeprefix("kdray-")
        raise EdgeMissing(
            f"{name} version {version.version} ({alias}) has no ONNX export; make one with "
            f"`python tune/export.py --dataset {dataset} --alias {alias}`"
        )
    Path(dest).mkdir(parents=True, exist_ok=True)
    local = Path(client.download_artifacts(version.run_id, ONNX_ARTIFACT, str(dest)))
    return local, json.loads((local / CARD_FILE).read_text())


def export_registered(
    name: str,
    alias: str,
    images: np.ndarray,
    out_dir: str | Path,
    tracking_uri: str | None = None,
    log: bool = True,
    version: str | None = None,
) -> tuple[EdgeExport, RegisteredModel]:
    """Export the student ``name@alias`` into ``out_dir`` and (``log``) beside its version.

    Args:
        images: uint8 (N, 3, S, S) test images for the parity check, at the model's input size.
        version: pin this version (``alias`` is then only recorded).

    Raises:
        MlflowException: no such model or alias.
        ExportError: not a student, images of another size than the model's input, or the
            graphs do not match torch.
    """
    with tempfile.TemporaryDirectory() as tmp:
        registered = fetch_registered(name, alias, tmp, tracking_uri, version=version)
        model, spec = load_model(registered.directory)
        record = registered.record
        cam = load_cam_choice(registered.directory)  # the variant and layer measured for it
    if images.ndim != 4 or images.shape[-2:] != (spec.image_size, spec.image_size):
        raise ExportError(
            f"{name} v{registered.version} takes {spec.image_size}x{spec.image_size} images; "
            f"the parity images are {'x'.join(map(str, images.shape[-2:]))} (another data set "
            "or image size than the model's: leave out --config to use the run's own)"
        )
    source = {
        "registered_model": name,
        "alias": alias,
        "version": registered.version,
        "run_id": registered.run_id,
        **({"data": record.public()} if record is not None else {}),
    }
    export = export_student(
        model,
        spec,
        out_dir,
        images,
        cam_layer=cam.layer if cam else None,
        source=source,
        # Unmeasured (a model registered before kdray chose a CAM per model): the variant
        # every explainer uses by default for it (explain.cam_method), so the graph serves it.
        cam_method=cam.method if cam else ExplainConfig().cam_method,
    )
    if log:
        log_edge(MlflowClient(tracking_uri=tracking_uri), name, registered.run_id, export)
    return export, registered
