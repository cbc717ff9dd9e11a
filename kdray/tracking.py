"""MLflow: where runs go and how kdray writes them.

All logging goes through an explicit :class:`mlflow.MlflowClient` and run ids, never through
mlflow's global "active run": the same code runs on the driver, in Ray Train rank 0 and in Tune
trial processes that Ray reuses between trials.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

from kdray.config import MLflowConfig
from kdray.provenance import SOURCE_TAG, source_digest
from kdray.workspace import Workspace

__all__ = ["LOCAL_UI", "Tracker", "flatten", "resolve_tracking_uri", "runs_url", "ui_hint"]

TAG_DATASET = "kdray.dataset"
TAG_ROLE = "kdray.role"
PARENT_TAG = "mlflow.parentRunId"
TAG_TRIAL = "kdray.trial_id"


def resolve_tracking_uri(cfg: MLflowConfig, ws: Workspace) -> str:
    """``mlflow.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else SQLite in the workspace."""
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{ws.mlflow_db.resolve()}"


LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` listens by default
SERVER_SCHEMES = ("http://", "https://")  # a tracking server, which serves the UI itself


def ui_base(tracking_uri: str) -> str:
    """Where the UI of ``tracking_uri`` is: the server itself, or ``mlflow ui`` on :data:`LOCAL_UI`."""
    return tracking_uri.rstrip("/") if tracking_uri.startswith(SERVER_SCHEMES) else LOCAL_UI


def runs_url(tracking_uri: str, experiment_id: str) -> str:
    """The UI page of the experiment's runs table (``#/experiments/<id>/runs``).

    MLflow 3 opens an experiment's bare URL on its GenAI overview (traces, token usage); the
    runs table with its Dataset column has its own route. A tracking server serves the UI at
    its own address; a local store is seen through ``mlflow ui`` on :data:`LOCAL_UI`.
    """
    base = ui_base(tracking_uri)
    return f"{base}/#/experiments/{experiment_id}/runs"


def compare_url(tracking_uri: str, experiment_id: str, run_ids: list[str]) -> str:
    """The UI page comparing ``run_ids`` side by side (``#/compare-runs``: parameters and metrics
    as a table, parallel coordinates, scatter and contour plots). A URL is the view, saved."""
    base = ui_base(tracking_uri)
    runs = quote(json.dumps(run_ids, separators=(",", ":")))
    experiments = quote(json.dumps([experiment_id], separators=(",", ":")))
    return f"{base}/#/compare-runs?runs={runs}&experiments={experiments}"


def ui_hint(tracking_uri: str, experiment_id: str) -> str:
    """What to run and open to compare the runs in the MLflow UI."""
    url = runs_url(tracking_uri, experiment_id)
    if tracking_uri.startswith(SERVER_SCHEMES):
        return f"MLflow runs: {url}"
    return f"MLflow: mlflow ui --backend-store-uri {tracking_uri}, then open {url}"


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> ``{"a.b": "value"}`` strings (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:6000]
    return out


@dataclass(frozen=True)
class Tracker:
    """A picklable handle on one MLflow experiment (tracking URI + experiment id)."""

    tracking_uri: str
    experiment_id: str

    @classmethod
    def open(cls, cfg: MLflowConfig, ws: Workspace) -> Tracker:
        """Create the experiment on the driver, with an absolute artifact location."""
        uri = resolve_tracking_uri(cfg, ws)
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(cfg.experiment)
        if experiment is not None:
            return cls(uri, experiment.experiment_id)
        artifact_location = None
        if uri.startswith("sqlite:"):
            ws.mlflow_artifacts.mkdir(parents=True, exist_ok=True)
            artifact_location = ws.mlflow_artifacts.resolve().as_uri()
        try:
            experiment_id = client.create_experiment(
                cfg.experiment, artifact_location=artifact_location
            )
        except Exception:  # created concurrently by another driver
            existing = client.get_experiment_by_name(cfg.experiment)
            if existing is None:
                raise
            experiment_id = existing.experiment_id
        return cls(uri, experiment_id)

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.tracking_uri)

    def start_run(
        self,
        name: str,
        dataset: str,
        role: str,
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """Create a run tagged with dataset and role (nested under ``parent_run_id``)."""
        all_tags = {
            TAG_DATASET: dataset,
            TAG_ROLE: role,
            SOURCE_TAG: source_digest(),
            **(tags or {}),
        }
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        return run.info.run_id

    def find_run(self, parent_run_id: str | None, tags: Mapping[str, str]) -> str | None:
        """The id of this experiment's run with all ``tags`` (under ``parent_run_id``), if any."""
        clauses = [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
        if parent_run_id:
            clauses.append(f"tags.`{PARENT_TAG}` = '{parent_run_id}'")
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=" and ".join(clauses), max_results=1
        )
        return runs[0].info.run_id if runs else None

    def resume_or_start_run(
        self,
        name: str,
        dataset: str,
        role: str,
        parent_run_id: str | None,
        tags: Mapping[str, str] | None = None,
    ) -> tuple[str, bool]:
        """The run of this ``role`` (and ``tags``) under ``parent_run_id``, else a new one.

        A stage that a killed driver left half done goes on in its own run (set back to
        RUNNING) instead of leaving a second, forever-RUNNING run beside the new one.

        Returns:
            (run id, True if an existing run was resumed).
        """
        run_id = self.find_run(parent_run_id, {TAG_ROLE: role, **(tags or {})})
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            return run_id, True
        return self.start_run(name, dataset, role, parent_run_id, tags), False

    def run_exists(self, run_id: str) -> bool:
        """True for an active run, False for a deleted or unknown one.

        Raises:
            MlflowException: any other error (e.g. the tracking server stayed unreachable
                through the client's retries): a resume must not take a transient error
                for "no such run" and start duplicate runs.
        """
        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except MlflowException as exc:
            if exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                return False
            raise

    def child_runs(self, parent_run_id: str, role: str) -> list[str]:
        """Ids of the runs of ``role`` nested under ``parent_run_id``, oldest first."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{TAG_ROLE}` = '{role}'",
            order_by=["attributes.start_time ASC"],
        )
        return [r.info.run_id for r in runs]

    def logged_steps(self, run_id: str, key: str) -> set[int]:
        """Steps at which ``key`` was already logged (a resumed loop skips them: one point per epoch)."""
        return {m.step for m in self.client.get_metric_history(run_id, key)}

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(
        self, run_id: str, metrics: Mapping[str, float], step: int | None = None
    ) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self.client.log_batch(run_id, metrics=items)

    def log_inputs(self, run_id: str, inputs: list[Any], attempts: int = 5) -> None:
        """Link dataset inputs to a run. The first link of a dataset creates its row in the
        experiment: two runs doing that at once (concurrent trials, concurrent datasets) race,
        and the loser gets a unique-constraint error. Tried again, it finds the row."""
        for attempt in range(attempts):
            try:
                self.client.log_inputs(run_id, inputs)
                return
            except MlflowException as exc:
                text = str(exc).lower()
                duplicate = "unique" in text or "duplicate" in text or "integrity" in text
                if not duplicate or attempt == attempts - 1:
                    raise
                time.sleep(0.1 * (attempt + 1))

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_config(self, run_id: str, config: Mapping[str, Any]) -> None:
        """The resolved config, as ``config.yaml`` artifact and flattened ``cfg.*`` params."""
        import yaml

        self.client.log_text(run_id, yaml.safe_dump(dict(config), sort_keys=False), "config.yaml")
        self.log_params(run_id, flatten(config, "cfg."))

    def log_figure(self, run_id: str, figure: Any, artifact_file: str) -> None:
        self.client.log_figure(run_id, figure, artifact_file)

    def log_artifacts(self, run_id: str, local_dir: str, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(run_id, local_dir, artifact_path)

    def end_run(
        self, run_id: str, status: str = "FINISHED", error: BaseException | None = None
    ) -> None:
        """Close the run; with ``error``, record its first line as tag ``kdray.error``."""
        if error is not None:
            text = (str(error).strip().splitlines() or [""])[0]
            self.set_tags(run_id, {"kdray.error": f"{type(error).__name__}: {text}"[:500]})
        self.client.set_terminated(run_id, status=status)

    def discard_lost(self, parent_run_id: str, role: str, known_trials: set[str]) -> list[str]:
        """Close as KILLED (tag ``kdray.lost``) and delete every RUNNING run of ``role`` under
        ``parent_run_id`` whose ``kdray.trial_id`` is not in ``known_trials``: runs no live job
        will ever end. Deleted runs stay in
        the store (``mlflow gc`` removes them; the UI lists them under "Deleted")."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{TAG_ROLE}` = "
            f"'{role}' and attributes.status = 'RUNNING'",
        )
        lost = [r.info.run_id for r in runs if r.data.tags.get(TAG_TRIAL) not in known_trials]
        for run_id in lost:
            self.set_tags(run_id, {"kdray.lost": "the driver stopped before Ray Tune saved it"})
            self.client.set_terminated(run_id, status="KILLED")
            self.client.delete_run(run_id)
        return lost

    def abandon(self, run_id: str) -> None:
        """Mark a run left RUNNING by an abandoned job, and its RUNNING children, KILLED."""
        children = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{run_id}' and attributes.status = 'RUNNING'",
        )
        for run in [*children, self.client.get_run(run_id)]:
            if run.info.status == "RUNNING":
                self.client.set_terminated(run.info.run_id, status="KILLED")
