"""Kill the sweep driver mid-run, resume with --resume: no trial lost or doubled in MLflow."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.integration
DATASETS = ("brain_tumor", "eye_disease")


def _cmd(ws: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "tune" / "run.py"), "--config", str(REPO / "configs" / "smoke.yaml"),
            "--workspace", str(ws), "--set", f"data.datasets=[{','.join(DATASETS)}]",
            "--set", "student.epochs=4", *extra]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "KDRAY_HOME")}


def test_killed_sweep_resumes_without_lost_or_doubled_trials(tmp_path):
    ws = tmp_path / "ws"
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(_cmd(ws), cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.time() + 400
        # Kill once the second dataset's trials have reported an epoch (its sweep is under way).
        while time.time() < deadline and proc.poll() is None:
            _, started, after = log_path.read_text().partition("eye_disease: teacher")
            if started and "checkpoint_000000" in after:
                break
            time.sleep(0.5)
        assert proc.poll() is None, "the run ended before it could be killed:\n" + log_path.read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    uri = f"sqlite:///{ws / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("kdray")
    assert not client.search_runs([experiment.experiment_id], "tags.`kdray.role` = 'champion' and "
                                  "tags.`kdray.dataset` = 'eye_disease'"), "killed too late"

    resumed = subprocess.run(_cmd(ws, "--resume"), cwd=REPO, env=_env(), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    assert "brain_tumor: finished in an earlier run" in resumed.stderr
    assert "eye_disease: restoring the Tune experiment" in resumed.stderr

    for dataset in DATASETS:
        runs = client.search_runs([experiment.experiment_id], f"tags.`kdray.dataset` = '{dataset}'")
        by_role: dict[str, list] = {}
        for run in runs:
            by_role.setdefault(run.data.tags["kdray.role"], []).append(run)
        assert len(by_role["parent"]) == 1 and len(by_role["teacher"]) == 1
        assert len(by_role["champion"]) == 1 and len(by_role["baseline"]) == 1
        trial_ids = [r.data.tags["kdray.trial_id"] for r in by_role["trial"]]
        assert len(trial_ids) == len(set(trial_ids)) == 2  # tune.num_samples: none lost, none doubled
        for run in runs:
            assert run.info.status == "FINISHED", (run.info.run_name, run.info.status)
        version = client.get_model_version_by_alias(f"kdray-{dataset}", "champion")
        assert version.run_id == by_role["champion"][0].info.run_id
