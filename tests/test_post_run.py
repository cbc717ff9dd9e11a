"""The user's sequence on a real workspace: `tune/run.py` on the smoke config, then the post-run
commands with no --config (they take the model's own config and data), and a config at hand that
would give the models other data refused before any work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kdray.config import load_config
from kdray.data.prepare import prepare_dataset
from kdray.engine import predict_logits
from kdray.workspace import Workspace

from conftest import clean_env

REPO = Path(__file__).resolve().parent.parent
DEFAULT = str(REPO / "configs" / "default.yaml")
SMOKE = load_config(REPO / "configs" / "smoke.yaml", [])
STAND_IN = "synthetic stand-in (20 images per class generated at 48 px, seed 0)"
pytestmark = pytest.mark.integration


def _test_split(ws: Path, dataset: str):
    """The smoke run's test split, prepared here from the smoke config (what the model saw)."""
    return prepare_dataset(SMOKE.data, dataset, Workspace.at(ws)).splits["test"]


def _synthetic_folders(ws: Path) -> set[str]:
    return {p.name for p in (ws / "data" / "synthetic").iterdir()}


def test_audit_without_config_audits_the_models_own_test_split(
    smoke_run, ray_local, tmp_path, capsys
):
    from kdray.audit.cli import audit_main
    from kdray.registry import load_registered

    ws, _ = smoke_run
    folders = _synthetic_folders(ws)
    out = tmp_path / "audit"
    argv = ["--dataset", "brain_tumor", "--workspace", str(ws), "--student-only", "--no-log"]
    assert audit_main([*argv, "--actors", "1", "--out", str(out)]) == 0, capsys.readouterr().err
    summary = json.loads((out / "audit.json").read_text())
    test = _test_split(ws, "brain_tumor")
    assert summary["image_size"] == SMOKE.data.image_size == 32
    assert summary["metrics"]["images"] == len(test)
    # The accuracy of the registered student on exactly those images, as torch computes it, and
    # as the run's own report measured it on its whole test split: not chance on other data.
    model, _ = load_registered("kdray-brain_tumor", tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")
    accuracy = float((predict_logits(model, test.images).argmax(1) == test.labels).mean())
    assert summary["metrics"]["student.accuracy"] == pytest.approx(accuracy)
    report = json.loads((ws / "reports" / "brain_tumor" / "report.json").read_text())["metrics"]
    assert summary["metrics"]["student.accuracy"] == pytest.approx(report["student.accuracy_test"])
    heading = (out / "audit.md").read_text().splitlines()[0]
    assert heading == f"# Audit: `brain_tumor`, the model's own test split ({STAND_IN})"
    assert _synthetic_folders(ws) == folders  # no other stand-in generated

    # The default config at hand would audit 64 px images of another stand-in: refused, before
    # any work (no folder written, nothing generated), with both values and the ways out.
    capsys.readouterr()
    refused = tmp_path / "refused"
    assert audit_main([*argv, "--config", DEFAULT, "--out", str(refused)]) == 2
    err = capsys.readouterr().err
    assert "kdray-brain_tumor v1 (@champion) was trained on the " + STAND_IN in err
    assert "data.image_size: 64 (the model's: 32)" in err
    assert "data.synthetic.n_per_class: 300 (the model's: 20)" in err
    assert "leave out --config" in err and "--root DIR" in err and "Traceback" not in err
    assert not refused.exists() and _synthetic_folders(ws) == folders


def test_export_without_config_checks_parity_on_the_models_own_test_images(
    smoke_run, tmp_path, capsys
):
    from kdray.edge.cli import export_main
    from kdray.edge.export import session

    ws, _ = smoke_run
    out = tmp_path / "m"
    argv = ["--dataset", "brain_tumor", "--workspace", str(ws), "--no-log"]
    assert export_main([*argv, "--out", str(out)]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    card = json.loads((out / "model.json").read_text())
    test = _test_split(ws, "brain_tumor")
    n = min(len(test), SMOKE.export.parity_images)
    assert card["image_size"] == 32 and card["parity"]["images"] == n
    assert f"on {n} images" in printed and "labels equal" in printed
    assert card["source"]["data"]["description"] == STAND_IN
    assert str(ws) not in json.dumps(card)  # the card travels: no server path in it
    logits, _ = session(out / card["files"]["predict"]).run(None, {"image": test.images[:n]})
    assert logits.shape == (n, 4)

    assert export_main([*argv, "--config", DEFAULT, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "data.image_size: 64 (the model's: 32)" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()
    assert export_main([*argv, "--alias", "nope"]) == 2
    assert "kdray-brain_tumor@nope" in capsys.readouterr().err


def _report(ws: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "tune" / "report.py"), "--workspace", str(ws), *extra],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_report_without_config_rebuilds_a_finished_run_and_says_what_it_saw(smoke_run, capsys):
    from kdray.cli import report_main

    ws, _ = smoke_run
    states = {p.stem: json.loads(p.read_text()) for p in (ws / "state").glob("*.json")}
    assert all("summary" in states[d] for d in ("alzheimer", "brain_tumor", "eye_disease"))
    report = ws / "reports" / "alzheimer" / "report.md"
    before = report.stat().st_mtime
    # The command a user types, in its own process (one dataset: each report costs seconds).
    proc = _report(ws, "--set", "data.datasets=[alzheimer]", "--set", "explain.shap_nsamples=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == [str(report)]
    assert report.stat().st_mtime > before
    text = report.read_text()
    assert text.splitlines()[0].endswith(f"(`alzheimer`), {STAND_IN}"), text.splitlines()[0]
    assert str(ws) not in text
    # Rebuilt on the run's own data: the whole test split of the 32 px stand-in.
    metrics = json.loads((ws / "reports" / "alzheimer" / "report.json").read_text())["metrics"]
    test = _test_split(ws, "alzheimer")
    assert metrics["localisation_test.images"] == int(test.masks.any(axis=(1, 2)).sum())
    # The run's state records its config and what its models saw.
    record = states["brain_tumor"]["data"]
    assert record["image_size"] == 32 and record["source"]["n_per_class"] == 20
    assert np.isclose(record["student_fraction"], SMOKE.data.synthetic.student_fraction)

    # Another config at hand: refused with what the run there saw; an empty workspace: said so.
    assert report_main(["--workspace", str(ws), "--config", DEFAULT]) == 2
    err = capsys.readouterr().err
    assert "made with another config" in err and STAND_IN in err and "leave out --config" in err
    assert report_main(["--workspace", str(ws / "nowhere")]) == 2
    assert "no finished run" in capsys.readouterr().err
