"""Read-only access to logged audits, for the viewer: the list, one audit's lists, one row's maps.

An audit is read from its MLflow run (``audit.json`` and ``audit.parquet`` artifacts), downloaded
once into a private temp folder and kept for the few audits last opened. Nothing here writes to
MLflow.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from mlflow import MlflowClient
from PIL import Image

from kdray.audit.scorer import decode_signed, map_at, thumbnail_at
from kdray.explain.render import heat_layer, png_bytes, signed_layer

__all__ = ["AuditBrowser", "AuditNotFound"]

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
KEEP = 4  # audits kept downloaded
VIEW_SIDE = 224  # maps are drawn at this side over the input thumbnail


class AuditNotFound(LookupError):
    """No such audit (or row); the message says which."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _finite(value: Any) -> Any:
    if isinstance(value, float | np.floating):
        return float(value) if np.isfinite(value) else None
    return value


class AuditBrowser:
    """The audits of one MLflow experiment."""

    def __init__(self, tracking_uri: str, experiment: str) -> None:
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.experiment = experiment
        self._dir = Path(tempfile.mkdtemp(prefix="kdray-audits-"))
        self._cache: OrderedDict[str, Path] = OrderedDict()
        self._lock = threading.Lock()

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)

    def list(self, dataset: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Finished audits, newest first."""
        experiment = self.client.get_experiment_by_name(self.experiment)
        if experiment is None:
            return []
        clauses = ["attributes.status = 'FINISHED'"]
        if dataset:
            clauses.append(f"tags.`kdray.dataset` = '{dataset}'")
        runs = self.client.search_runs(
            [experiment.experiment_id],
            " and ".join(clauses),
            order_by=["attributes.start_time DESC"],
            max_results=limit,
        )
        return [
            {
                "run_id": r.info.run_id,
                "dataset": r.data.tags.get("kdray.dataset", ""),
                "source": r.data.params.get("source", ""),
                "student": r.data.params.get("model.student", ""),
                "started": r.info.start_time,
                "images": int(r.data.metrics.get("images", 0)),
                "unreadable": int(r.data.metrics.get("unreadable", 0)),
            }
            for r in runs
        ]

    def _folder(self, run_id: str) -> Path:
        if not RUN_ID.match(run_id):
            raise AuditNotFound(f"no audit {run_id!r}")
        with self._lock:
            if run_id in self._cache:
                self._cache.move_to_end(run_id)
                return self._cache[run_id]
            try:
                run = self.client.get_run(run_id)
            except Exception:  # noqa: BLE001 - an unknown id, or another experiment's run
                raise AuditNotFound(f"no audit {run_id}") from None
            if run.data.tags.get("kdray.role") != "audit":
                raise AuditNotFound(f"run {run_id} is not an audit")
            names = {a.path for a in self.client.list_artifacts(run_id)}  # outage: raises
            if not {"audit.json", "audit.parquet"} <= names:
                raise AuditNotFound(f"audit {run_id} has no audit.json / audit.parquet")
            dest = self._dir / run_id
            dest.mkdir(exist_ok=True)
            try:
                for name in ("audit.json", "audit.parquet"):
                    self.client.download_artifacts(run_id, name, str(dest))
            except BaseException:
                shutil.rmtree(dest, ignore_errors=True)  # the next call downloads afresh
                raise
            self._cache[run_id] = dest
            while len(self._cache) > KEEP:
                _, old = self._cache.popitem(last=False)
                shutil.rmtree(old, ignore_errors=True)
            return dest

    def summary(self, run_id: str) -> dict[str, Any]:
        """``audit.json``: the lists, the aggregates, the models."""
        return json.loads((self._folder(run_id) / "audit.json").read_text())

    def row(self, run_id: str, index: int) -> dict[str, Any]:
        """One image: labels, probabilities, scores, and its maps drawn as PNG layers (base64)
        over the stored input thumbnail."""
        folder = self._folder(run_id)
        summary = json.loads((folder / "audit.json").read_text())
        table = pq.read_table(folder / "audit.parquet", filters=pc.field("index") == index)
        if table.num_rows != 1:
            raise AuditNotFound(f"audit {run_id} has no row {index}")
        row = table.to_pylist()[0]
        names = summary["class_names"]
        out: dict[str, Any] = {
            "index": index,
            "name": row["name"],
            "error": row["error"] or None,
            "note": row["note"] or None,
            "label": names[row["label"]] if row["label"] >= 0 else None,
            "has_mask": row["has_mask"],
            "agree": row.get("agree"),
            "input_png": None,
            "models": {},
        }
        if row["error"]:
            return out
        out["input_png"] = _b64(png_bytes(thumbnail_at(row["thumbnail"], VIEW_SIDE)))
        for role in summary["roles"]:
            model: dict[str, Any] = {
                "label": names[row[f"{role}_label"]],
                "probabilities": dict(zip(names, row[f"{role}_probs"], strict=True)),
                "confidence": _finite(row[f"{role}_confidence"]),
                "maps": {},
            }
            side = row[f"{role}_map_side"]
            for method in summary["methods"]:
                data = row.get(f"{role}_{method}")
                if not data:
                    continue
                if method == "shap":
                    size = summary["image_size"]
                    values = decode_signed(data, size, row[f"{role}_shap_scale"])
                    layer = Image.fromarray(signed_layer(values)).resize(
                        (VIEW_SIDE, VIEW_SIDE), Image.Resampling.BILINEAR
                    )
                    drawn, native = np.asarray(layer), [size, size]
                else:
                    drawn, native = heat_layer(map_at(data, side, VIEW_SIDE)), list(side)
                model["maps"][method] = {
                    "heat_png": _b64(png_bytes(drawn)),
                    "side": native,
                    "pointing_game": _finite(row.get(f"{role}_{method}_pointing")),
                    "energy_in_mask": _finite(row.get(f"{role}_{method}_energy")),
                }
            out["models"][role] = model
        for method in summary["methods"]:
            if f"maps_rank_{method}" in row:
                out.setdefault("agreement", {})[method] = {
                    "rank_correlation": _finite(row[f"maps_rank_{method}"]),
                    "top10_overlap": _finite(row[f"maps_iou_{method}"]),
                }
        return out
