"""What stops a run before it starts: unreadable dataset files, a workspace that cannot be written.

Through the real command line: exit code 2, one message, no traceback, and nothing started (no
MLflow database, no Ray).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pydicom
import pytest
from mlflow import MlflowClient
from PIL import Image
from pydicom.data import get_testdata_file

from kdray.config import DataConfig, MLflowConfig
from kdray.data.prepare import build_manifest, prepare_dataset
from kdray.data.specs import get_spec
from kdray.pipeline import log_data
from kdray.tracking import Tracker
from kdray.workspace import Workspace, WorkspaceError

from conftest import REPO, clean_env


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            str(REPO / "tune" / "run.py"),
            "--config",
            str(REPO / "configs" / "smoke.yaml"),
            *args,
        ],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _eye_folder(root: Path) -> list[str]:
    """A real-layout eye_disease copy with one file of each unreadable kind; their paths."""
    for name in get_spec("eye_disease").classes:
        for i in range(4):
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 30), (20 * i, 80, 160)).save(root / name / f"ok_{i}.png")
    good = (root / "cataract" / "ok_0.png").read_bytes()
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm", download=False))
    del ds.PixelData
    bad = {
        "glaucoma/broken.jpg": b"",
        "normal/notes.png": b"not an image\n",
        "cataract/cut.png": good[: len(good) // 2],
        "diabetic_retinopathy/bomb.png": _bomb_png(20000, 20000),
    }
    for rel, data in bad.items():
        (root / rel).write_bytes(data)
    ds.save_as(root / "normal" / "no_pixels.dcm")
    return [*bad, "normal/no_pixels.dcm"]


def test_unreadable_files_stop_the_run_before_anything_starts(tmp_path):
    bad = _eye_folder(tmp_path / "eye")
    ws = tmp_path / "ws"
    proc = _run(
        "--workspace",
        str(ws),
        "--set",
        "data.datasets=[eye_disease]",
        "--set",
        f"data.roots.eye_disease={tmp_path / 'eye'}",
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert f"{len(bad)} unreadable image file(s)" in proc.stderr
    for rel, reason in (
        ("glaucoma/broken.jpg", "empty file"),
        ("normal/notes.png", "not an image"),
        ("cataract/cut.png", "truncated or corrupt PNG"),
        (
            "diabetic_retinopathy/bomb.png",
            "image has 400,000,000 pixels, above the 64-megapixel limit",
        ),
        ("normal/no_pixels.dcm", "DICOM file has no pixel data"),
    ):
        assert f"  {rel}: {reason}" in proc.stderr, rel
    assert "data.skip_unreadable: true" in proc.stderr
    assert not (ws / "mlflow.db").exists() and not (ws / "ray_results").exists()
    (log,) = (ws / "logs").glob("run-*.log")  # everything the process printed, Ray's too
    assert "Ray instance" not in proc.stderr + log.read_text()  # no Ray was started


def test_skipped_files_are_recorded_on_the_run(tmp_path):
    bad = _eye_folder(tmp_path / "eye")
    ws = Workspace(tmp_path / "ws").create()
    cfg = DataConfig(
        datasets=["eye_disease"],
        skip_unreadable=True,
        image_size=32,
        roots={"eye_disease": str(tmp_path / "eye")},
    )
    manifest = build_manifest(get_spec("eye_disease"), tmp_path / "eye", None, cfg, ws)
    assert sorted(s["path"] for s in manifest.skipped) == sorted(bad)
    assert not {e["path"] for e in manifest.entries} & set(bad)
    tracker = Tracker.open(MLflowConfig(), ws)
    run_id = tracker.start_run("parent-eye", "eye_disease", "parent")
    data = prepare_dataset(cfg, "eye_disease", ws)
    assert data.manifest.skipped == manifest.skipped
    log_data(tracker, run_id, data)
    client = MlflowClient(tracking_uri=tracker.tracking_uri)
    run = client.get_run(run_id)
    assert run.data.params["n_unreadable"] == str(len(bad))
    # The splits are the run's MLflow dataset inputs: the manifest's digest, counts per class.
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"eye_disease-train", "eye_disease-val", "eye_disease-test"}
    for split, counted in manifest.counts().items():
        entry = inputs[f"eye_disease-{split}"]
        assert entry.dataset.digest == manifest.fingerprint[:12]
        assert [(t.key, t.value) for t in entry.tags] == [("mlflow.data.context", split)]
        profile = json.loads(entry.dataset.profile)
        assert profile["num_images"] == counted == sum(profile["class_counts"].values())
        assert set(profile["class_counts"]) == set(get_spec("eye_disease").classes)
    recorded = json.loads(
        Path(
            client.download_artifacts(run_id, "data/unreadable_files.json", str(tmp_path))
        ).read_text()
    )
    assert {s["path"]: s["reason"] for s in recorded["skipped"]} == {
        s["path"]: s["reason"] for s in manifest.skipped
    }


def _unwritable(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        return locked / "ws"
    return Path("/sys/fs/kdray-ws")  # root ignores permissions; sysfs refuses new entries


def test_unwritable_workspace_is_a_clear_error_before_the_work(tmp_path):
    ws = _unwritable(tmp_path)
    proc = _run("--workspace", str(ws), "--set", "data.datasets=[brain_tumor]")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"workspace {ws} is not writable" in proc.stderr and "Traceback" not in proc.stderr


def test_full_disk_is_a_clear_error(tmp_path, monkeypatch):
    free = shutil.disk_usage(tmp_path).free // 2**20
    with pytest.raises(WorkspaceError, match="MB free on the disk of workspace"):
        Workspace(tmp_path / "ws").check(min_free_mb=free + 10**6)
    monkeypatch.setenv("KDRAY_MIN_FREE_MB", str(free + 10**6))
    proc = _run("--workspace", str(tmp_path / "ws2"), "--set", "data.datasets=[brain_tumor]")
    assert proc.returncode == 2 and "KDRAY_MIN_FREE_MB" in proc.stderr, proc.stderr[-2000:]
    assert Workspace(tmp_path / "ws3").check(min_free_mb=1).root.is_dir()
