"""The smoke pipeline submitted as a Ray job to a local 2-node cluster, logging to an MLflow server.

Both "nodes" run on this machine (`ray start --head` + `ray start --address`, one CPU each).
The run goes in through the Jobs API as a cluster user's would: `ray job submit --working-dir
<a copy of the checkout>`, MLFLOW_TRACKING_URI in the job's runtime_env. The copy's kdray differs
from the installed one, so the runs' source digests show which code the driver and the trials on
both nodes ran. Two datasets run at once (`ray.max_concurrent_datasets: 2`).
Trials run the teacher live (`kd.teacher_logits: live`), so its weights reach the second node.
The server is reached through a TCP proxy that goes down for a few seconds inside a running trial,
once a trial of each dataset has logged: the trials ride the outage out (MLflow's client retries)
instead of failing, and the trial it hit logs epochs before and after it. The
registered champion then loads from the server with `mlflow.pyfunc.load_model` and predicts
through `mlflow models predict`.
Only processes this test starts are stopped (never `ray stop`, which would stop every Ray here).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from kdray.provenance import source_digest

from conftest import Proxy, free_port

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# make test-cluster (CI's second step), not make test: two Ray nodes, an MLflow server and a Ray
# job, about 3 min of both cores in the suite (docs/testing.md).
pytestmark = [pytest.mark.integration, pytest.mark.cluster]
EPOCHS = 8  # the students' epochs in this test


def _agent_ports() -> list[str]:
    """Free ports for a node's agents. Ray's defaults (52365 for the dashboard agent, which
    serves the Jobs API's submissions) are taken by any other Ray on the machine, e.g. another
    test's: the job head then answers "No available agent to submit job" for good."""
    return [
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
    ]


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def _stop_all(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every process group at once, SIGKILL what is left after 4 s (ours only)."""
    running = [p for p in procs if p.poll() is None]
    for proc in running:
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.time() + 4
    for proc in running:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.time()))
    for proc in running:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _champion_loads_with_standard_mlflow_tooling(mlflow_uri: str, tmp_path: Path) -> None:
    """``mlflow.pyfunc.load_model`` and ``mlflow models predict`` on the champion, from the server."""
    import mlflow
    import numpy as np

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(
        mlflow_uri
    )  # process-wide (and sets $MLFLOW_TRACKING_URI): undone below
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
        [
            str(BIN / "mlflow"),
            "models",
            "predict",
            "-m",
            "models:/kdray-brain_tumor@champion",
            "-i",
            str(request),
            "-t",
            "json",
            "--env-manager",
            "local",
        ],
        env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 0, cli.stderr[-3000:]
    predictions = json.loads(cli.stdout.strip().splitlines()[-1])["predictions"]
    assert predictions[0].keys() == set(probabilities.columns)
    assert list(predictions[0].values()) == pytest.approx(list(probabilities.iloc[0]), abs=1e-5)


def _wait_tcp(port: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            return
        except OSError:
            if time.time() > deadline:
                raise TimeoutError(port) from None
            time.sleep(0.2)


def _wait_alive_nodes(dashboard: str, count: int, timeout: float) -> None:
    """Until Ray's State API (what `ray list nodes` asks) lists ``count`` ALIVE nodes."""
    deadline, alive = time.time() + timeout, 0
    while time.time() < deadline:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            with urllib.request.urlopen(f"{dashboard}/api/v0/nodes", timeout=5) as response:
                nodes = json.load(response)["data"]["result"]["result"]
            alive = sum(node["state"] == "ALIVE" for node in nodes)
            if alive >= count:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{alive} of {count} Ray nodes alive after {timeout} s")


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
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "KDRAY_HOME")
    }
    env.update(
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
    )
    ray_port, mlflow_port, dashboard_port = free_port(), free_port(), free_port()
    temp_dir = f"/tmp/kdray-cl-{os.getpid()}"
    procs = []
    try:
        procs.append(
            _start(
                [
                    str(BIN / "mlflow"),
                    "server",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(mlflow_port),
                    "--workers",
                    "1",
                    "--backend-store-uri",
                    f"sqlite:///{tmp_path / 'server.db'}",
                    "--artifacts-destination",
                    str(tmp_path / "server-artifacts"),
                ],
                env,
                tmp_path / "mlflow.log",
            )
        )
        procs.append(
            _start(
                [
                    str(BIN / "ray"),
                    "start",
                    "--head",
                    "--block",
                    f"--port={ray_port}",
                    "--num-cpus=1",
                    f"--temp-dir={temp_dir}",
                    "--node-ip-address=127.0.0.1",
                    # the dashboard serves the Jobs API (`ray job submit`)
                    "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dashboard_port}",
                    *_agent_ports(),
                ],
                env,
                tmp_path / "head.log",
            )
        )
        address = f"127.0.0.1:{ray_port}"
        _wait_tcp(ray_port, 90)  # the head's GCS: the worker node joins through it
        # Its own temp dir, as on a real node: with a shared one the two nodes' runtime-env agents
        # manage the same unpacked working_dir, and one deletes it under the other's processes.
        procs.append(
            _start(
                [
                    str(BIN / "ray"),
                    "start",
                    "--block",
                    f"--address={address}",
                    "--num-cpus=1",
                    "--node-ip-address=127.0.0.1",
                    f"--temp-dir={temp_dir}-w",
                    *_agent_ports(),
                ],
                env,
                tmp_path / "worker.log",
            )
        )
        _wait_http(f"http://127.0.0.1:{mlflow_port}/health", 90)
        dashboard = f"http://127.0.0.1:{dashboard_port}"
        _wait_http(f"{dashboard}/api/version", 90)
        _wait_alive_nodes(dashboard, 2, 90)
        yield address, dashboard, f"http://127.0.0.1:{mlflow_port}", env
    finally:
        _stop_all(list(reversed(procs)))
        for path in (temp_dir, f"{temp_dir}-w"):  # this test's Ray sessions only
            shutil.rmtree(path, ignore_errors=True)


def _outage_mid_trial(
    server_uri: str,
    proxy: Proxy,
    seconds: float,
    done: threading.Event,
    outage: dict[str, float],
    datasets: tuple[str, ...],
    epochs: int,
) -> None:
    """Watch the server directly; take the proxy down for ``seconds`` once a trial of every one of
    ``datasets`` has logged an epoch and some Tune trial (KD or baseline) is running with at
    least 4 epochs still to log: the outage lands inside that trial, so the trial's later epochs
    can only reach the server after it (MLflow's client retries)."""
    client = MlflowClient(tracking_uri=server_uri)
    while not done.is_set():
        experiment = client.get_experiment_by_name("kdray")
        trials = (
            [
                r
                for r in client.search_runs([experiment.experiment_id], "")
                if r.data.tags.get("kdray.role") in ("trial", "baseline-trial")
            ]
            if experiment
            else []
        )
        logged = {t.data.tags["kdray.dataset"] for t in trials if "val_accuracy" in t.data.metrics}
        for trial in trials if logged >= set(datasets) else []:
            if trial.info.status != "RUNNING" or "val_accuracy" not in trial.data.metrics:
                continue
            history = client.get_metric_history(trial.info.run_id, "val_accuracy")
            if len(history) <= epochs - 4:
                proxy.down()
                outage["start"] = time.time()
                time.sleep(seconds)
                proxy.up()
                outage["end"] = time.time()
                return
        time.sleep(0.1)


def _checkout_to_ship(tmp_path: Path) -> tuple[Path, str]:
    """A copy of this checkout (git's files, no .venv or workspace) whose kdray differs from the
    installed one by a comment: its source digest tells which kdray a process imported."""
    files = (
        subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=REPO,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    checkout = tmp_path / "checkout"
    for name in filter(None, files):
        if (REPO / name).is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, checkout / name)
    with open(checkout / "kdray" / "__init__.py", "a") as f:
        f.write(
            "# shipped to the cluster by `ray job submit --working-dir` (tests/test_cluster.py)\n"
        )
    digest = subprocess.run(
        [
            sys.executable,
            "-c",
            "from kdray.provenance import source_digest; print(source_digest())",
        ],
        cwd=checkout,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert digest != source_digest()  # the copy is told apart from the installed kdray
    return checkout, digest


def _submit(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``ray job submit``, again while the head has no job agent yet. The dashboard answers
    before its agent has registered; Ray then refuses the submission, before creating any job,
    with "No available agent to submit job, please try again later" (seen once in a fresh clone)."""
    deadline = time.time() + 120
    while True:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
        if (
            proc.returncode == 0
            or "No available agent" not in proc.stdout + proc.stderr
            or time.time() > deadline
        ):
            return proc
        time.sleep(3)


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def test_a_ray_job_ships_kdray_and_runs_two_datasets_at_once_logging_to_the_server(
    cluster, tmp_path
):
    """`ray job submit --working-dir <checkout>` (the Jobs API): the driver and every trial on both
    nodes run the shipped kdray; two datasets' pipelines run at once; MLflow goes down once."""
    address, dashboard, mlflow_uri, env = cluster
    checkout, shipped = _checkout_to_ship(tmp_path)
    proxy = Proxy(int(mlflow_uri.rsplit(":", 1)[1]))
    # Jobs take their environment from runtime_env: the driver and every worker log to the proxy.
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{proxy.port}"}}
    done, outage = threading.Event(), {}
    watcher = threading.Thread(
        target=_outage_mid_trial,
        args=(mlflow_uri, proxy, 5.0, done, outage, ("brain_tumor", "eye_disease"), EPOCHS),
    )
    watcher.start()
    try:
        proc = _submit(
            [
                str(BIN / "ray"),
                "job",
                "submit",
                "--address",
                dashboard,
                "--working-dir",
                str(checkout),
                "--runtime-env-json",
                json.dumps(runtime_env),
                "--",
                sys.executable,
                "tune/run.py",
                "--config",
                "configs/smoke.yaml",
                "--workspace",
                str(tmp_path / "ws"),
                "--set",
                "data.datasets=[brain_tumor, eye_disease]",
                "--set",
                "ray.max_concurrent_datasets=2",
                # One trial at a time per sweep: on the two CPUs, one sweep cannot take both while
                # the other waits, so the datasets' trials overlap if their pipelines do.
                "--set",
                "tune.max_concurrent_trials=1",
                # Trials long enough (about a second) for the outage to land inside one; every
                # trial trains them all (no early stop), so the one it hit logs after it.
                "--set",
                f"student.epochs={EPOCHS}",
                "--set",
                "tune.scheduler=none",
                "--set",
                "ray.num_cpus=null",
                "--set",
                "kd.teacher_logits=live",  # the teacher itself travels to both nodes
                "--set",
                f"ray.storage_path={tmp_path / 'shared'}",
                "--set",  # the report runs in the driver alone: the smoke tests cover it
                "explain.report=false",
                "--set",  # so does the ONNX export (two at once: tests/test_edge.py)
                "export.onnx=false",
            ],
            cwd=tmp_path,
            env=env,
        )
    finally:
        done.set()
        watcher.join()
        proxy.down()
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout, proc.stdout[-3000:]
    assert outage.get("end"), "the server never went down: no trial logged an epoch"
    assert not (tmp_path / "ws" / "mlflow.db").exists()  # everything went to the server
    client = MlflowClient(tracking_uri=mlflow_uri)
    experiment = client.get_experiment_by_name("kdray")
    runs = client.search_runs([experiment.experiment_id], "")
    parents = {
        r.data.tags["kdray.dataset"]: r for r in runs if r.data.tags["kdray.role"] == "parent"
    }
    assert set(parents) == {"brain_tumor", "eye_disease"}
    trials = [r for r in runs if r.data.tags["kdray.role"] == "trial"]
    by_dataset = {d: [t for t in trials if t.data.tags["kdray.dataset"] == d] for d in parents}
    for dataset, dataset_trials in by_dataset.items():
        assert len(dataset_trials) == 2  # each trial exactly one run, outage or not
        for trial in dataset_trials:  # nested under its own dataset's parent run
            assert trial.data.tags["mlflow.parentRunId"] == parents[dataset].info.run_id
    for trial in trials:
        assert trial.info.status == "FINISHED", trial.data.tags.get("kdray.error")
        # scheduler none: every configured epoch, each logged once, outage or not
        steps = [m.step for m in client.get_metric_history(trial.info.run_id, "val_accuracy")]
        assert sorted(steps) == list(range(EPOCHS)), steps
    # The two datasets ran at once: their parent runs overlap, and so do their teachers' Ray Train
    # runs (one per node, both started with the pipelines). Tune trials are too short here (about
    # a second of training each, one CPU per node) for their overlap to be reliable.
    span = lambda r: (r.info.start_time, r.info.end_time)  # noqa: E731
    assert _overlap(span(parents["brain_tumor"]), span(parents["eye_disease"]))
    teachers = {
        r.data.tags["kdray.dataset"]: r for r in runs if r.data.tags["kdray.role"] == "teacher"
    }
    assert _overlap(span(teachers["brain_tumor"]), span(teachers["eye_disease"]))
    # The outage hit the Tune searches while they ran: a trial (KD or baseline) logged epochs
    # before the server went down and after it came back, in one FINISHED run.
    spanning = []
    for run in runs:
        if run.data.tags["kdray.role"] not in ("trial", "baseline-trial"):
            continue
        assert run.info.status == "FINISHED", run.data.tags.get("kdray.error")
        stamps = [
            m.timestamp / 1e3 for m in client.get_metric_history(run.info.run_id, "val_accuracy")
        ]
        if min(stamps) < outage["start"] and max(stamps) > outage["end"]:
            spanning.append(run.info.run_name)
    assert spanning, ("no trial logged on both sides of the outage", outage)
    assert len({t.data.tags["kdray.node_id"] for t in trials}) == 2  # trials on both nodes
    # The driver and the trials on both nodes ran the kdray the job shipped, not the installed one.
    assert {r.data.tags["kdray.source_digest"] for r in [*parents.values(), *trials]} == {shipped}
    assert {t.data.params["teacher_logits"] for t in trials} == {"live"}
    for dataset in parents:
        assert client.get_model_version_by_alias(f"kdray-{dataset}", "champion").run_id
    _champion_loads_with_standard_mlflow_tooling(mlflow_uri, tmp_path)
    assert (tmp_path / "shared").is_dir()  # Ray results went to the configured storage path

    # The dataset audit from a driver joining the cluster (--address): one actor per node (1 CPU
    # each), both do work; the student alone, Grad-CAM only (the smallest audit that spreads).
    audit = subprocess.run(
        [
            sys.executable,
            str(REPO / "tune" / "audit.py"),
            "--config",
            str(REPO / "configs" / "smoke.yaml"),
            "--workspace",
            str(tmp_path / "ws"),
            "--dataset",
            "brain_tumor",
            "--address",
            address,
            "--student-only",
            "--methods",
            "gradcam",
            "--actors",
            "2",
            "--batch-size",
            "2",
            "--out",
            str(tmp_path / "audit"),
        ],
        cwd=tmp_path,
        env={**env, "MLFLOW_TRACKING_URI": mlflow_uri},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert audit.returncode == 0, audit.stdout[-5000:] + audit.stderr[-3000:]
    rows = pq.read_table(tmp_path / "audit" / "audit.parquet").to_pandas()
    assert len(rows) == 16 and (rows["error"] == "").all()  # the smoke test split, every file
    assert rows["node"].nunique() == 2, rows["node"].value_counts()  # actors on both nodes
    runs = client.search_runs([client.get_experiment_by_name("kdray-audit").experiment_id])
    champion = client.get_model_version_by_alias("kdray-brain_tumor", "champion").version
    assert [r.data.params["model.student"] for r in runs] == [f"kdray-brain_tumor/{champion}"]
