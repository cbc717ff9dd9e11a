"""Kill the driver (and its local Ray) at three points of one run, resume each time with --resume.

Kill points, in the order one run meets them: during the teacher's Ray Train fit, in the KD sweep
once a trial has finished and another is mid-way (the restored search must neither rerun the
finished trial nor restart the interrupted one from scratch), and during the CE baseline's search
(while the champion's seeds retrain). The last resume runs the rest, the transparency report included (a
stage that is not saved as done is redone whole: no kill point of its own). After it every
MLflow run is FINISHED, every stage has exactly one run, every epoch one metric point, and the
champion and teacher are registered once each.

Each kill waits for its stage to show in the run's own MLflow database (read-only SQLite reads),
so the kill lands inside the stage, not at a guessed time.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.integration
DATASET = "brain_tumor"
TEACHER_EPOCHS, STUDENT_EPOCHS, TRIALS = 5, 6, 3


def _cmd(ws: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(REPO / "tune" / "run.py"),
        "--config",
        str(REPO / "configs" / "smoke.yaml"),
        "--workspace",
        str(ws),
        "--set",
        f"data.datasets=[{DATASET}]",
        "--set",
        f"teacher.epochs={TEACHER_EPOCHS}",
        "--set",
        f"student.epochs={STUDENT_EPOCHS}",
        # More steps per epoch than smoke's: each kill window lasts a few seconds, not one.
        "--set",
        "teacher.batch_size=8",
        "--set",
        "student.batch_size=4",
        "--set",
        f"tune.num_samples={TRIALS}",
        "--set",
        "tune.scheduler=none",  # no early stops
        "--set",
        "seeds=[0,1]",
        "--set",  # the report is killed and resumed, not checked: its sanity checks can go
        "explain.sanity=false",
        "--set",  # the ONNX export is tested on the smoke run (tests/test_pipeline_e2e.py)
        "export.onnx=false",
        "--set",  # its own Ray temp dir: other tests' pipelines may run beside it (pytest-xdist)
        f"ray.temp_dir=/tmp/kdray-resume-{os.getpid()}",
        *extra,
    ]


def _env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "KDRAY_HOME")
    }


class Db:
    """Read-only SQL on the run's mlflow.db: what has been logged so far, per role."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _query(self, sql: str, *args: object) -> list[tuple]:
        if not self.path.is_file():
            return []
        try:
            with sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=2) as con:
                return con.execute(sql, args).fetchall()
        except sqlite3.OperationalError:  # locked by a writer, or tables not created yet
            return []

    def runs(self, role: str) -> list[tuple[str, str]]:
        """(run id, status) of every run with this kdray.role."""
        return self._query(
            "SELECT r.run_uuid, r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
            "WHERE t.key = 'kdray.role' AND t.value = ?",
            role,
        )

    def epochs(self, role: str) -> list[int]:
        """Logged val_accuracy points per run of this role."""
        return [
            n
            for (n,) in self._query(
                "SELECT COUNT(m.step) FROM tags t LEFT JOIN metrics m ON m.run_uuid = t.run_uuid "
                "AND m.key = 'val_accuracy' WHERE t.key = 'kdray.role' AND t.value = ? GROUP BY t.run_uuid",
                role,
            )
        ]


def _run_until(ws: Path, log_path: Path, resume: bool, when: Callable[[], bool], what: str) -> None:
    """Start the pipeline and SIGKILL it (driver and its local Ray) once ``when()`` holds."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            _cmd(ws, *(["--resume"] if resume else [])),
            cwd=REPO,
            env=_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline, reached = time.time() + 300, False
        while time.time() < deadline and proc.poll() is None:
            if reached := when():
                break
            time.sleep(0.1)
        alive = proc.poll() is None
        if alive:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert alive, (
        f"the run ended before it could be killed {what}:\n" + log_path.read_text()[-3000:]
    )
    assert reached, f"not killed {what} (timed out):\n" + log_path.read_text()[-3000:]


def test_killed_three_times_resumes_to_one_clean_run(tmp_path):
    ws = tmp_path / "ws"
    db = Db(ws / "mlflow.db")

    def trial_epochs() -> list[int]:
        return db.epochs("trial")

    kill_points: list[tuple[str, Callable[[], bool]]] = [
        # Epoch 1 logged: epoch 0's checkpoint has registered (rank 0 logs before it reports).
        ("during the teacher", lambda: 2 <= sum(db.epochs("teacher")) < TEACHER_EPOCHS - 1),
        (  # Epoch 2 logged: the trial's epoch-1 checkpoint exists; one trial already done.
            "mid-trial with a trial done",
            lambda: (
                STUDENT_EPOCHS in trial_epochs()
                and any(2 <= n < STUDENT_EPOCHS - 1 for n in trial_epochs())
            ),
        ),
        (
            "during the baseline's search",
            lambda: (
                bool(db.runs("champion"))
                and bool(db.epochs("baseline-trial"))
                and max(db.epochs("baseline-trial")) >= 2
                and not db.runs("baseline")
            ),
        ),
    ]
    for i, (what, when) in enumerate(kill_points):
        _run_until(ws, tmp_path / f"run{i}.log", resume=i > 0, when=when, what=what)

    resumed = subprocess.run(
        _cmd(ws, "--resume"), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    assert f"{DATASET}: teacher reused" in resumed.stderr
    logs = "".join((tmp_path / f"run{i}.log").read_text() for i in range(1, len(kill_points)))
    assert f"{DATASET}: restoring the Tune experiment" in logs
    # The last resume started after the kill in the baseline's search: it restores that search.
    assert any(
        f"{DATASET}: restoring the Tune experiment" in line and line.rstrip().endswith("-baseline")
        for line in resumed.stderr.splitlines()
    ), resumed.stderr[-3000:]

    client = MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("kdray")
    runs = client.search_runs([experiment.experiment_id], f"tags.`kdray.dataset` = '{DATASET}'")
    by_role: dict[str, list] = {}
    for run in runs:
        by_role.setdefault(run.data.tags["kdray.role"], []).append(run)
        assert run.info.status == "FINISHED", (
            run.info.run_name,
            run.info.status,
            run.data.tags.get("kdray.error"),
        )
    assert {role: len(v) for role, v in by_role.items()} == {
        "parent": 1,
        "teacher": 1,
        "trial": TRIALS,
        "champion": 1,
        "baseline-trial": TRIALS,
        "baseline": 1,
    }
    trial_ids = [r.data.tags["kdray.trial_id"] for r in by_role["trial"]]
    assert len(set(trial_ids)) == TRIALS  # none lost, none doubled

    # One metric point per epoch, though epochs were interrupted and trained again.
    (teacher,) = by_role["teacher"]
    steps = [m.step for m in client.get_metric_history(teacher.info.run_id, "val_accuracy")]
    assert sorted(steps) == list(range(TEACHER_EPOCHS))
    assert (
        int(teacher.data.tags["kdray.resumed_from_epoch"]) >= 1
    )  # from its checkpoint, not epoch 0
    for trial in by_role["trial"] + by_role["baseline-trial"]:
        # scheduler none: every trial runs every configured epoch, each logged exactly once
        steps = [m.step for m in client.get_metric_history(trial.info.run_id, "val_accuracy")]
        assert sorted(steps) == list(range(STUDENT_EPOCHS)), steps

    (champion,) = by_role["champion"]
    versions = client.search_model_versions(f"name = 'kdray-{DATASET}'")
    assert [v.run_id for v in versions] == [champion.info.run_id]  # registered once
    assert len(client.search_model_versions(f"name = 'kdray-{DATASET}-teacher'")) == 1
    assert (
        client.get_model_version_by_alias(f"kdray-{DATASET}", "champion").run_id
        == champion.info.run_id
    )
    # The multi-seed path: one row per seed, mean and spread on champion and baseline.
    for run in (champion, by_role["baseline"][0]):
        seeds = client.get_metric_history(run.info.run_id, "seed_test_accuracy")
        assert sorted(m.step for m in seeds) == [0, 1]
        assert {"test_accuracy_mean", "test_accuracy_std"} <= set(run.data.metrics)
    (parent,) = by_role["parent"]
    assert "explain.student.met_ms.gradcam" in parent.data.metrics
    assert "| brain_tumor | KD student (champion) |" in resumed.stdout
