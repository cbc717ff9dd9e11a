"""The MLflow UI on a finished run: the URL kdray prints opens the runs table, with datasets.

A real ``mlflow server`` on the smoke run's store and Debian's headless chromium; the screenshot
is kept in the workspace (``reports/mlflow_runs.png``) and its path printed.
"""

from __future__ import annotations

import csv

import pytest
from mlflow import MlflowClient
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from kdray.tracking import Tracker, compare_url, runs_url, ui_hint

from conftest import mlflow_server

pytestmark = pytest.mark.integration


def test_runs_url_and_hint():
    assert (
        runs_url("http://mlflow.internal:5000/", "7")
        == "http://mlflow.internal:5000/#/experiments/7/runs"
    )
    assert runs_url("sqlite:////ws/mlflow.db", "1") == "http://127.0.0.1:5000/#/experiments/1/runs"
    assert ui_hint("sqlite:////ws/mlflow.db", "1") == (
        "MLflow: mlflow ui --backend-store-uri sqlite:////ws/mlflow.db, then open "
        "http://127.0.0.1:5000/#/experiments/1/runs"
    )


@pytest.fixture(scope="module")
def ui(smoke_run):
    """One real ``mlflow server`` (the UI) over the smoke run's store, for this module's tests."""
    ws, _ = smoke_run
    with mlflow_server(f"sqlite:///{ws / 'mlflow.db'}", ws / "mlflow-ui.log") as base:
        yield base


def test_the_printed_url_opens_the_runs_table_with_datasets(smoke_run, ui, browser):
    ws, proc = smoke_run
    store = f"sqlite:///{ws / 'mlflow.db'}"
    experiment = MlflowClient(store).get_experiment_by_name("kdray").experiment_id
    assert ui_hint(store, experiment) in proc.stdout  # what the run printed at its end
    base = ui
    browser.get(runs_url(base, experiment))
    text = lambda d: d.find_element(By.TAG_NAME, "body").text  # noqa: E731
    WebDriverWait(browser, 90).until(lambda d: "brain_tumor-train" in text(d))
    body = text(browser)
    shot = ws / "reports" / "mlflow_runs.png"
    browser.save_screenshot(str(shot))
    print(f"screenshot: {shot}")
    assert "/runs" in browser.current_url and "overview" not in browser.current_url
    assert "Training runs" in body and "Dataset" in body
    for dataset in ("brain_tumor", "eye_disease", "alzheimer"):
        assert dataset in body  # each dataset's parent run, with the data it saw


def test_the_printed_comparison_url_opens_a_datasets_trials_side_by_side(smoke_run, ui, browser):
    ws, proc = smoke_run
    store = f"sqlite:///{ws / 'mlflow.db'}"
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("kdray").experiment_id
    rows = list(csv.DictReader((ws / "reports" / "summary.csv").open()))
    (parent,) = [r["parent_run_id"] for r in rows if r["dataset"] == "brain_tumor"]
    trials = Tracker(store, experiment).child_runs(parent, "trial")
    assert len(trials) == 2  # smoke: tune.num_samples 2
    printed = f"brain_tumor's 2 KD trials compared: {compare_url(store, experiment, trials)}"
    assert printed in proc.stdout
    base = ui
    browser.get(compare_url(base, experiment, trials))
    text = lambda d: d.find_element(By.TAG_NAME, "body").text  # noqa: E731
    WebDriverWait(browser, 90).until(lambda d: "Comparing 2 Runs" in text(d))
    WebDriverWait(browser, 30).until(lambda d: "trial-brain_tumor-" in text(d))
    body = text(browser)
    shot = ws / "reports" / "mlflow_compare.png"
    browser.save_screenshot(str(shot))
    print(f"screenshot: {shot}")
    assert "Parallel Coordinates Plot" in body
    for run in trials:
        assert run in body  # both trials' columns
