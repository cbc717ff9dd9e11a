"""The smoke sweep on a local 2-node Ray cluster logging to an MLflow tracking server.

Both "nodes" run on this machine (`ray start --head` + `ray start --address`, one CPU each);
the driver joins with --address and logs through MLFLOW_TRACKING_URI, as on a real cluster.
Trials run the teacher live (`kd.teacher_logits: live`), so its weights reach the second node.
The server is reached through a TCP proxy that goes down for a few seconds once the first trial
has logged: the trials ride the outage out (MLflow's client retries) instead of failing. The
registered champion then loads from the server with `mlflow.pyfunc.load_model` and predicts
through `mlflow models predict`.
Only processes this test starts are stopped (never `ray stop`, which would stop every Ray here).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import Proxy

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop_all(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every process group at once, SIGKILL what is left after 10 s (ours only)."""
    running = [p for p in procs if p.poll() is None]
    for proc in running:
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.time() + 10
    for proc in running:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.time()))
    for proc in running:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _champion_loads_with_standard_mlflow_tooling(mlflow_uri: str, tmp_path: Path) -> None:
    """``mlflow.pyfunc.load_model`` and ``mlflow models predict`` on the champion, from the server."""
    import json

    import mlflow
    import numpy as np

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(mlflow_uri)  # process-wide (and sets $MLFLOW_TRACKING_URI): undone below
    try:
        model = mlflow.pyfunc.load_model("models:/kdray-brain_tumor@champion")
    finally:
        mlflow.set_tracking_uri(previous)
    images = np.random.default_rng(0).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    probabilities = model.predict(images)
    assert list(probabilities.columns) == ["glioma", "meningioma", "notumor", "pituitary"]
    np.testing.assert_allclose(probabilities.to_numpy().sum(1), 1.0, rtol=1e-5)
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"inputs": images[:1].tolist()}))
    cli = subprocess.run(
        [str(BIN / "mlflow"), "models", "predict", "-m", "models:/kdray-brain_tumor@champion",
         "-i", str(request), "-t", "json", "--env-manager", "local"],
        env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri}, capture_output=True, text=True,
        timeout=300)
    assert cli.returncode == 0, cli.stderr[-3000:]
    predictions = json.loads(cli.stdout.strip().splitlines()[-1])["predictions"]
    assert predictions[0].keys() == set(probabilities.columns)
    assert list(predictions[0].values()) == pytest.approx(list(probabilities.iloc[0]), abs=1e-5)


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


@pytest.fixture()
def cluster(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "KDRAY_HOME")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    ray_port, mlflow_port = _free_port(), _free_port()
    temp_dir = f"/tmp/kdray-cl-{os.getpid()}"
    procs = []
    try:
        procs.append(_start([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                             "--artifacts-destination", str(tmp_path / "server-artifacts")],
                            env, tmp_path / "mlflow.log"))
        procs.append(_start([str(BIN / "ray"), "start", "--head", "--block", f"--port={ray_port}",
                             "--num-cpus=1", "--include-dashboard=false", f"--temp-dir={temp_dir}",
                             "--node-ip-address=127.0.0.1"], env, tmp_path / "head.log"))
        address = f"127.0.0.1:{ray_port}"
        time.sleep(8)
        procs.append(_start([str(BIN / "ray"), "start", "--block", f"--address={address}", "--num-cpus=1",
                             "--node-ip-address=127.0.0.1"], env, tmp_path / "worker.log"))
        _wait_http(f"http://127.0.0.1:{mlflow_port}/health", 90)
        time.sleep(5)
        yield address, f"http://127.0.0.1:{mlflow_port}", env
    finally:
        _stop_all(list(reversed(procs)))


def _outage_once_a_trial_logged(server_uri: str, proxy: Proxy, seconds: float, done: threading.Event,
                                outage: dict[str, float]) -> None:
    """Watch the server directly; take the proxy down for ``seconds`` after a trial's first epoch."""
    client = MlflowClient(tracking_uri=server_uri)
    while not done.is_set():
        experiment = client.get_experiment_by_name("kdray")
        trials = client.search_runs([experiment.experiment_id], "tags.`kdray.role` = 'trial'") if experiment else []
        if any("val_accuracy" in t.data.metrics for t in trials):
            proxy.down()
            outage["start"] = time.time()
            time.sleep(seconds)
            proxy.up()
            outage["end"] = time.time()
            return
        time.sleep(0.2)


def test_smoke_sweep_spans_both_nodes_and_logs_to_the_server(cluster, tmp_path):
    address, mlflow_uri, env = cluster
    proxy = Proxy(int(mlflow_uri.rsplit(":", 1)[1]))
    env = {**env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{proxy.port}"}
    done, outage = threading.Event(), {}
    watcher = threading.Thread(target=_outage_once_a_trial_logged, args=(mlflow_uri, proxy, 5.0, done, outage))
    watcher.start()
    try:
            proc = subprocess.run(
            [sys.executable, str(REPO / "tune" / "run.py"), "--config", str(REPO / "configs" / "smoke.yaml"),
             "--workspace", str(tmp_path / "ws"), "--address", address,
             "--set", "data.datasets=[brain_tumor]", "--set", "ray.num_cpus=null",
             "--set", "kd.teacher_logits=live",  # the teacher itself travels to both nodes
             "--set", f"ray.storage_path={tmp_path / 'shared'}"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
        )
    finally:
        done.set()
        watcher.join()
        proxy.down()
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert outage.get("end"), "the server never went down: no trial logged an epoch"
    assert not (tmp_path / "ws" / "mlflow.db").exists()  # everything went to the server
    client = MlflowClient(tracking_uri=mlflow_uri)
    experiment = client.get_experiment_by_name("kdray")
    trials = client.search_runs([experiment.experiment_id], "tags.`kdray.role` = 'trial'")
    assert len(trials) == 2  # each trial exactly one run, outage or not
    for trial in trials:
        assert trial.info.status == "FINISHED", trial.data.tags.get("kdray.error")
        steps = [m.step for m in client.get_metric_history(trial.info.run_id, "val_accuracy")]
        assert sorted(steps) == list(range(int(trial.data.tags["kdray.epochs_run"]))), steps
    # The outage hit the sweep while it ran: at least one trial was still running then.
    assert any(t.info.end_time / 1e3 > outage["start"] for t in trials)
    nodes = {t.data.tags["kdray.node_id"] for t in trials}
    assert len(nodes) == 2, f"trials ran on {nodes}"  # one live-teacher trial per node
    assert {t.data.params["teacher_logits"] for t in trials} == {"live"}
    assert client.get_model_version_by_alias("kdray-brain_tumor", "champion").run_id
    _champion_loads_with_standard_mlflow_tooling(mlflow_uri, tmp_path)
    assert (tmp_path / "shared").is_dir()  # Ray results went to the configured storage path
