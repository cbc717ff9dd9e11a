"""The whole product path on real Ray (Train + Tune) and real MLflow (SQLite): the smoke config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from kdray.models import load_model

REPO = Path(__file__).resolve().parent.parent
DATASETS = ("brain_tumor", "eye_disease", "alzheimer")
pytestmark = pytest.mark.integration


def _run(ws: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "KDRAY_HOME")}
    return subprocess.run(
        [sys.executable, str(REPO / "tune" / "run.py"), "--config", str(REPO / "configs" / "smoke.yaml"),
         "--workspace", str(ws), *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )


def _runs(client: MlflowClient, dataset: str, role: str):
    experiment = client.get_experiment_by_name("kdray")
    return client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`kdray.dataset` = '{dataset}' and tags.`kdray.role` = '{role}'",
    )


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    ws = tmp_path_factory.mktemp("smoke") / "ws"
    proc = _run(ws)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return ws, proc


def test_smoke_run_leaves_teacher_and_trials_in_mlflow(smoke_run):
    ws, proc = smoke_run
    client = MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")
    for dataset in DATASETS:
        (parent,) = _runs(client, dataset, "parent")
        (teacher,) = _runs(client, dataset, "teacher")
        trials = _runs(client, dataset, "trial")
        assert teacher.info.status == "FINISHED"
        assert teacher.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert "test_accuracy" in teacher.data.metrics and "cfg.kd.alpha" in teacher.data.params
        assert len(client.get_metric_history(teacher.info.run_id, "val_accuracy")) == 1  # 1 epoch
        assert len(trials) >= 2
        for trial in trials:
            assert trial.info.status == "FINISHED"
            assert {"alpha", "temperature", "widths"} <= set(trial.data.params)
            assert 0.0 <= trial.data.metrics["val_accuracy"] <= 1.0
            assert len(client.get_metric_history(trial.info.run_id, "val_accuracy")) == 2  # 2 epochs
            assert trial.data.tags["mlflow.parentRunId"] == parent.info.run_id
        champions = [t for t in trials if t.data.tags.get("kdray.champion") == "true"]
        assert len(champions) == 1 and "test_accuracy" in champions[0].data.metrics
        assert max(t.data.metrics["best_val_accuracy"] for t in trials) == \
            champions[0].data.metrics["best_val_accuracy"]
        artifacts = {a.path for a in client.list_artifacts(teacher.info.run_id)}
        assert {"config.yaml", "test_confusion.png", "model"} <= artifacts
    assert "| brain_tumor |" in proc.stdout and "| alzheimer |" in proc.stdout
    assert (ws / "reports" / "summary.csv").read_text().count("\n") == 4


def test_champion_loads_and_predicts(smoke_run):
    ws, _ = smoke_run
    for dataset in DATASETS:
        model, spec = load_model(ws / "champions" / dataset)
        assert spec.kind == "student" and spec.dataset == dataset
        assert model(torch.rand(2, 3, spec.image_size, spec.image_size)).shape == (2, 4)


def test_rerun_reuses_the_teacher(smoke_run):
    ws, _ = smoke_run
    proc = _run(ws, "--set", "data.datasets=[eye_disease]", "--set", "tune.num_samples=1")
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "eye_disease: teacher reused" in proc.stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")
    assert len(_runs(client, "eye_disease", "teacher")) == 1  # no second teacher training
    assert len(_runs(client, "eye_disease", "parent")) == 2
