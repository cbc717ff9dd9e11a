"""The whole product path on real Ray (Train + Tune) and real MLflow (SQLite): the smoke config."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from kdray.models import load_model

from conftest import clean_env

REPO = Path(__file__).resolve().parent.parent
DATASETS = ("brain_tumor", "eye_disease", "alzheimer")
pytestmark = pytest.mark.integration


def _run(ws: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            str(REPO / "tune" / "run.py"),
            "--config",
            str(REPO / "configs" / "smoke.yaml"),
            "--workspace",
            str(ws),
            *extra,
        ],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def _runs(client: MlflowClient, dataset: str, role: str):
    experiment = client.get_experiment_by_name("kdray")
    return client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`kdray.dataset` = '{dataset}' and tags.`kdray.role` = '{role}'",
    )


def test_smoke_run_leaves_the_mlflow_contract(smoke_run):
    ws, proc = smoke_run
    client = MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")
    for dataset in DATASETS:
        (parent,) = _runs(client, dataset, "parent")
        (teacher,) = _runs(client, dataset, "teacher")
        (champion,) = _runs(client, dataset, "champion")
        (baseline,) = _runs(client, dataset, "baseline")
        trials = _runs(client, dataset, "trial")
        for run in (teacher, champion, baseline, *trials):
            assert run.info.status == "FINISHED"
            assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
            assert "cfg.kd.alpha" in run.data.params  # the resolved config
        assert "test_accuracy" in teacher.data.metrics
        # Every run names the data it saw (MLflow's "Dataset" column): one digest per dataset.
        seen = {
            run.info.run_id: {(i.dataset.name, i.dataset.digest) for i in run.inputs.dataset_inputs}
            for run in (parent, teacher, champion, baseline, *trials)
        }
        digest = parent.data.tags["kdray.manifest"]
        val, test = (f"{dataset}-val", digest), (f"{dataset}-test", digest)
        for run in (parent, teacher):
            assert seen[run.info.run_id] == {(f"{dataset}-train", digest), val, test}, (
                run.info.run_name
            )
        # The students train on a quarter of the training split (data.synthetic.student_fraction):
        # a dataset of its own, with its own digest, the same for every student run.
        (cut,) = seen[champion.info.run_id] - {val, test}
        assert cut[0] == f"{dataset}-train-25%" and cut[1] != digest
        assert seen[champion.info.run_id] == seen[baseline.info.run_id] == {cut, val, test}
        for trial in trials:
            assert seen[trial.info.run_id] == {cut, val}
        for run in (teacher, champion, baseline):
            assert 0.0 <= run.data.metrics["test_ece"] <= 1.0  # calibration beside accuracy
        assert len(client.get_metric_history(teacher.info.run_id, "val_accuracy")) == 1  # 1 epoch
        assert len(trials) >= 2
        for trial in trials:
            assert {"alpha", "temperature", "widths", "depth", "lr"} <= set(trial.data.params)
            assert 0.0 <= trial.data.metrics["val_accuracy"] <= 1.0
            assert {"params", "flops", "best_val_accuracy"} <= set(trial.data.metrics)
            assert (
                len(client.get_metric_history(trial.info.run_id, "val_accuracy")) == 2
            )  # 2 epochs
        source = {t.info.run_id: t for t in trials}[champion.data.tags["kdray.source_trial_run"]]
        for key in ("alpha", "temperature", "widths", "lr"):
            assert champion.data.params[key] == source.data.params[key]
        assert {"val_accuracy", "test_accuracy", "test_f1_macro", "params", "flops"} <= set(
            champion.data.metrics
        )
        assert champion.data.metrics["val_accuracy"] == source.data.metrics["best_val_accuracy"]
        assert float(baseline.data.params["alpha"]) == 1.0
        assert baseline.data.params["widths"] == champion.data.params["widths"]
        assert "test_accuracy" in baseline.data.metrics
        # The baseline had the KD sweep's budget over lr and is its best trial on validation.
        baseline_trials = _runs(client, dataset, "baseline-trial")
        assert len(baseline_trials) == len(trials) == 2  # smoke: tune.num_samples 2
        for trial in baseline_trials:
            assert trial.info.status == "FINISHED"
            assert trial.data.tags["mlflow.parentRunId"] == parent.info.run_id
            assert float(trial.data.params["alpha"]) == 1.0
            assert trial.data.params["widths"] == champion.data.params["widths"]
            assert 0.001 <= float(trial.data.params["lr"]) <= 0.01
        assert len({t.data.params["lr"] for t in baseline_trials}) == 2
        assert baseline_trials[0].data.params["lr"] != baseline_trials[1].data.params["lr"]
        best = {t.info.run_id: t for t in baseline_trials}[
            baseline.data.tags["kdray.source_trial_run"]
        ]
        assert best.data.metrics["best_val_accuracy"] == max(
            t.data.metrics["best_val_accuracy"] for t in baseline_trials
        )
        assert baseline.data.params["lr"] == best.data.params["lr"]
        assert baseline.data.metrics["val_accuracy"] == best.data.metrics["best_val_accuracy"]
        assert (
            baseline.data.tags["kdray.selected_from"]
            == champion.data.tags["kdray.selected_from"]
            == "2"
        )
        # Transparency: every KD and CE trial scored its best model (the last epoch: smoke has no
        # rung), the champion is the most transparent of the trials in the accuracy band, with
        # its CAM and the accuracy-only pick tagged; the parent has the Pareto front and the
        # KD-against-CE comparison.
        for trial in [*trials, *baseline_trials]:
            history = client.get_metric_history(trial.info.run_id, "transparency")
            assert [m.step for m in history] == [1], trial.info.run_id  # after epoch 2 of 2
            assert 0.0 <= history[0].value <= 1.0
            assert {"transparency.blank_rate", "transparency.layer_side"} <= set(trial.data.metrics)
        for trial in trials:  # KD trials also measure their agreement with the teacher's maps
            assert "transparency.teacher_agreement" in trial.data.metrics
        band = [
            t
            for t in trials
            if t.data.metrics["best_val_accuracy"]
            >= max(x.data.metrics["best_val_accuracy"] for x in trials) - 0.01
        ]
        assert source.data.metrics["transparency"] == max(
            t.data.metrics["transparency"] for t in band
        )
        assert champion.data.tags["kdray.champion_rule"] == "transparent"
        assert champion.data.tags["kdray.cam.method"] == "hirescam"
        assert champion.data.tags["kdray.accuracy_pick_run"] in {t.info.run_id for t in trials}
        assert champion.data.metrics["transparency"] == source.data.metrics["transparency"]
        assert 0.0 <= champion.data.metrics["test_transparency"] <= 1.0
        assert {"pareto.front_size", "pareto.champion_transparency"} <= set(parent.data.metrics)
        assert "kd_vs_ce.transparency.mean" in parent.data.metrics
        pareto = {a.path for a in client.list_artifacts(parent.info.run_id, "pareto")}
        assert pareto == {"pareto/pareto.png", "pareto/pareto.md"}
        # What the search found, read back from these trials (kdray.search_findings).
        assert parent.data.metrics["search.trials"] == len(trials)
        assert 1 <= parent.data.metrics["search.seed_rank"] <= len(trials)
        search = {a.path for a in client.list_artifacts(parent.info.run_id, "search")}
        assert search == {"search/search.png", "search/search.md"}
        artifacts = {a.path for a in client.list_artifacts(champion.info.run_id)}
        assert {"config.yaml", "test_confusion.png", "model"} <= artifacts
        assert {"config.yaml", "test_confusion.png", "model"} <= {
            a.path for a in client.list_artifacts(teacher.info.run_id)
        }
        assert {"summary.md", "summary.csv"} <= {
            a.path for a in client.list_artifacts(parent.info.run_id)
        }
        report_files = {a.path for a in client.list_artifacts(parent.info.run_id, "transparency")}
        assert {
            "transparency/report.md",
            "transparency/explanations.png",
            "transparency/reliability.png",
            "transparency/sanity.png",
        } <= report_files
        # the sanity checks of every method and model, and the blank Grad-CAM count
        for model in ("teacher", "student"):
            for method in ("feature_maps", "gradcam", "shap"):
                assert f"explain.{model}.randomisation.{method}" in parent.data.metrics
            assert f"explain.{model}.random_logit.gradcam" in parent.data.metrics
            assert f"explain.{model}.blank_test.gradcam" in parent.data.metrics
        assert {"explain.teacher.ece", "explain.student.ece", "explain.baseline.ece"} <= set(
            parent.data.metrics
        )
        assert "explain.student.met_ms.gradcam" in parent.data.metrics
        assert "feature_maps.png" in {a.path for a in client.list_artifacts(champion.info.run_id)}
    assert "| brain_tumor | KD student (champion) |" in proc.stdout
    stand_in = "synthetic stand-in (20 images per class generated at 48 px, seed 0)"
    assert proc.stdout.startswith(f"Data: brain_tumor: {stand_in}; eye_disease: {stand_in}")
    assert "2 CE trials |" in proc.stdout and "How each side was chosen" in proc.stdout
    assert "What the KD searches found" in proc.stdout and "across datasets:" in proc.stdout
    assert "the Pareto front of the KD trials" in proc.stdout
    assert "- brain_tumor: HiResCAM at `features.block" in proc.stdout
    assert "Does distillation make the student more transparent?" in proc.stdout
    assert "Sanity checks (Adebayo et al. 2018" in proc.stdout
    for dataset in ("brain_tumor", "eye_disease", "alzheimer"):
        report = (ws / "reports" / dataset / "report.md").read_text()
        assert "## What the search found" in report and "rank" in report
        # the CAM under its variant's name (explain.cam_method: HiResCAM by default)
        assert "## Sanity checks" in report and "| student | HiResCAM |" in report
        assert (ws / "reports" / dataset / "search.png").stat().st_size > 10_000
    assert (ws / "reports" / "summary.csv").read_text().count("\n") == 4


def test_the_console_shows_progress_and_the_log_file_the_rest(smoke_run):
    """(Needs a fresh smoke run: with KDRAY_TEST_SMOKE_WS a resumed run has no epochs to show.)"""
    ws, proc = smoke_run
    terminal = proc.stdout + proc.stderr
    (log_path,) = re.findall(r"the full log \(Ray, Tune, MLflow\) is (\S+);", proc.stderr)
    log = Path(log_path).read_text()
    assert Path(log_path).parent == ws / "logs"
    for dataset in ("brain_tumor", "eye_disease", "alzheimer"):
        assert f"{dataset}: teacher epoch 1/1 · val acc" in terminal
        assert f"{dataset}: KD sweep 2/2 trials done" in terminal
        assert f"{dataset}: CE baseline search 2/2 trials done" in terminal
        assert f"{dataset}: teacher epoch 1/1 · val acc" in log  # kdray's lines are in both
    # Ray's worker lines and Tune's tables went to the log file only.
    for chatter in ("(RayTrainWorker pid=", "Trial status:", "Started a local Ray instance"):
        assert chatter in log
        assert chatter not in terminal
    # kdray's progress lines and the summary (with its transparency sections), no chatter
    assert len(terminal.splitlines()) < 150, terminal
    # Ray Train's PlacementGroupCleaner warned every second without the State API (dashboard).
    assert "Failed to query Ray Train Controller" not in terminal + log


def test_champions_are_registered_and_load_by_alias(smoke_run):
    from kdray.config import load_config
    from kdray.data.prepare import prepare_dataset
    from kdray.edge.export import session
    from kdray.edge.graph import OUTPUTS
    from kdray.edge.publish import fetch_edge
    from kdray.explain.gradcam import grad_cam
    from kdray.explain.layer_maps import feature_maps
    from kdray.explain.scoring import load_cam_choice
    from kdray.registry import fetch_registered, load_registered
    from kdray.workspace import Workspace

    ws, _ = smoke_run
    uri = f"sqlite:///{ws / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    SMOKE = load_config(REPO / "configs" / "smoke.yaml", [])  # noqa: N806
    for dataset in DATASETS:
        model, spec = load_registered(f"kdray-{dataset}", "champion", tracking_uri=uri)
        assert spec.kind == "student" and spec.dataset == dataset
        x = torch.rand(2, 3, spec.image_size, spec.image_size)
        assert model(x).shape == (2, 4)
        local, _ = load_model(ws / "champions" / dataset)
        assert torch.equal(model(x), local(x))
        version = client.get_model_version_by_alias(f"kdray-{dataset}", "champion")
        assert version.run_id == _runs(client, dataset, "champion")[0].info.run_id
        teacher, tspec = load_registered(f"kdray-{dataset}-teacher", "champion", tracking_uri=uri)
        assert tspec.kind == "teacher"
        # The ONNX copy beside the version: parity recomputed here, on the run's own test images,
        # against the torch model and kdray's torch explainers (not read from the card).
        folder, card = fetch_edge(f"kdray-{dataset}", "champion", ws / "fetched" / dataset, uri)
        assert card["source"]["version"] == str(version.version)
        # the CAM measured for the champion (its cam.json, in the registered version)
        with tempfile.TemporaryDirectory() as tmp:
            choice = load_cam_choice(
                fetch_registered(f"kdray-{dataset}", "champion", tmp, uri).directory
            )
        assert (card["cam_method"], card["cam_layer"]) == (choice.method, choice.layer)
        assert choice.method == "hirescam" and choice.layer in model.block_names
        test = prepare_dataset(SMOKE.data, dataset, Workspace.at(ws)).splits["test"]
        images = test.images[: SMOKE.export.parity_images]
        explained = session(folder / card["files"]["explain"]).run(None, {"image": images})
        out = dict(zip(OUTPUTS, explained, strict=True))
        with torch.no_grad():
            ref = model(torch.from_numpy(images).float() / 255).numpy()
        assert np.abs(out["logits"] - ref).max() <= 1e-4
        assert (out["logits"].argmax(1) == ref.argmax(1)).all()
        fm = feature_maps(model, images)
        cam = grad_cam(model, images, card["cam_layer"], None, card["cam_method"])
        assert np.abs(out["feature_maps"] - fm.maps).max() <= 1e-4
        assert np.abs(out["gradcam"] - cam.maps).max() <= 1e-4
        assert version.tags["kdray.onnx"] == "onnx/"
        sess = session(folder / card["files"]["predict"])
        logits = sess.run(["logits"], {"image": (x * 255).round().to(torch.uint8).numpy()})[0]
        with torch.no_grad():
            ref = model((x * 255).round() / 255)
        assert abs(logits - ref.numpy()).max() <= 1e-4


def test_rerun_reuses_the_teacher(smoke_run):
    ws, _ = smoke_run
    proc = _run(
        ws,
        "--set",
        "data.datasets=[eye_disease]",
        "--set",
        "tune.num_samples=1",
        "--set",
        "explain.report=false",  # the report is not what this test checks
        # The export stays on: this run registers the dataset's next champion, which the serving
        # tests that share the smoke workspace then serve, from its ONNX copy.
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "eye_disease: teacher reused" in proc.stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")
    assert len(_runs(client, "eye_disease", "teacher")) == 1  # no second teacher training
    assert len(_runs(client, "eye_disease", "parent")) == 2
