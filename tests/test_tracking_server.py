"""A real ``mlflow server`` that becomes unreachable for a few seconds (cluster mode).

Between kdray and the server sits a TCP proxy the test can take down (connections refused, open
ones cut) and bring back on the same port: an outage of an exact length, without restarting the
server. What must hold: logging and resume checks made during the outage wait and succeed once the
server is back (MLflow's client retries with backoff), and when the server stays down the resume
check fails with an error instead of answering "no such run" (which would start duplicate runs).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from kdray.config import MLflowConfig
from kdray.tracking import Tracker
from kdray.workspace import Workspace

from conftest import Proxy, mlflow_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    with mlflow_server(
        f"sqlite:///{root / 'mlflow.db'}",
        root / "server.log",
        "--default-artifact-root",
        (root / "artifacts").as_uri(),
    ) as url:
        yield int(url.rsplit(":", 1)[1]), root


@pytest.fixture()
def proxied(server, tmp_path, monkeypatch):
    # Retries as MLflow ships them are 7 with backoff factor 2 (minutes in all); a shorter
    # schedule keeps the test quick and still spans the outage.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "6")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    proxy = Proxy(server[0])
    ws = Workspace(tmp_path / "ws").create()
    tracker = Tracker.open(
        MLflowConfig(
            tracking_uri=f"http://127.0.0.1:{proxy.port}", experiment=f"outage-{tmp_path.name}"
        ),
        ws,
    )
    yield proxy, tracker
    proxy.down()


def test_logging_and_resume_checks_ride_out_a_few_seconds_of_outage(proxied):
    proxy, tracker = proxied
    run_id = tracker.start_run("trial-outage", "eye_disease", "trial")
    tracker.log_metrics(run_id, {"val_accuracy": 0.5}, step=0)

    proxy.down()
    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:  # what a trial does during the outage
        logged = pool.submit(tracker.log_metrics, run_id, {"val_accuracy": 0.75}, 1)
        exists = pool.submit(tracker.run_exists, run_id)
        time.sleep(4)
        assert not logged.done() and not exists.done()  # waiting, not failed
        proxy.up()
        logged.result(timeout=120)
        assert exists.result(timeout=120) is True
    assert time.monotonic() - started >= 4
    tracker.end_run(run_id)

    run = MlflowClient(tracker.tracking_uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    history = MlflowClient(tracker.tracking_uri).get_metric_history(run_id, "val_accuracy")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.5), (1, 0.75)]  # once each


def test_a_server_that_stays_down_is_an_error_not_a_missing_run(proxied, monkeypatch):
    proxy, tracker = proxied
    run_id = tracker.start_run("trial-down", "eye_disease", "trial")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    proxy.down()
    with pytest.raises(MlflowException, match="127.0.0.1"):
        tracker.run_exists(run_id)  # not False: --resume must not start a second run
    proxy.up()
    assert tracker.run_exists(run_id) is True
    assert tracker.run_exists("0" * 32) is False  # an unknown run is still "no such run"


def test_a_server_uri_keeps_no_tracking_store_on_the_workspace_disk(proxied, tmp_path):
    _, tracker = proxied
    assert tracker.tracking_uri.startswith("http://")
    assert not list(Path(tmp_path / "ws").glob("**/*.db"))  # nothing tracked on local disk
