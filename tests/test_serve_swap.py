"""A new champion reaches a running replica's store without a restart, and a bad one never does:
real MLflow registry (SQLite), the store the Serve replicas hold, no Serve."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import torch

from kdray.config import MLflowConfig
from kdray.models import ModelSpec, build_model, save_model
from kdray.registry import log_model_folder, register_model
from kdray.serving.deployments import probabilities, store_status
from kdray.serving.store import ModelStore
from kdray.tracking import Tracker
from kdray.workspace import Workspace

CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]


def _register(tracker: Tracker, tmp_path, seed: int, classes=CLASSES, broken: bool = False) -> str:
    spec = ModelSpec("student", 4, 32, list(classes), widths=[4, 8], dataset="brain_tumor")
    torch.manual_seed(seed)
    folder = save_model(build_model(spec), spec, tmp_path / f"v{seed}")
    if broken:  # weights of another architecture than model.json says
        (folder / "model.json").write_text(json.dumps({**spec.to_dict(), "widths": [8, 8]}))
    run_id = tracker.start_run(f"champion-{seed}", "brain_tumor", "champion")
    log_model_folder(tracker.client, run_id, folder)
    return register_model(tracker.client, "kdray-brain_tumor", run_id, "champion")


def test_the_store_swaps_in_a_new_version_and_refuses_a_bad_one_while_serving(tmp_path):
    ws = Workspace(tmp_path / "ws").create()
    tracker = Tracker.open(MLflowConfig(), ws)
    assert _register(tracker, tmp_path, 1) == "1"
    store = ModelStore(tracker.tracking_uri, ["brain_tumor"], "champion", ("student",))
    assert store.get("brain_tumor").registered.version == "1" and store.refresh() == []

    # Requests keep coming while versions change: every one is answered.
    x = [np.random.default_rng(0).integers(0, 256, (3, 32, 32), dtype=np.uint8)]
    stop, answers, failures = threading.Event(), [], []

    def client() -> None:
        while not stop.is_set():
            try:
                m = store.get("brain_tumor")
                with torch.inference_mode():
                    answers.append((m.registered.version, probabilities(m.model, x, store.device)))
            except Exception as exc:  # noqa: BLE001 - counted, and the test fails on it
                failures.append(exc)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        assert _register(tracker, tmp_path, 2) == "2"
        (changed,) = store.refresh()
        assert "v1 -> v2" in changed and store.get("brain_tumor").registered.version == "2"
        # Other classes: the contract clients rely on. Never swapped in; v2 keeps serving.
        assert _register(tracker, tmp_path, 3, classes=[*CLASSES[1:], CLASSES[0]]) == "3"
        assert store.refresh() == [] and store.get("brain_tumor").registered.version == "2"
        status = store_status(store)
        (why,) = status["swaps"].values()
        assert "v3 (@champion) not swapped in: ValueError: other classes" in why
        assert "still serving v2" in why and status["ready"]  # not a readiness failure
        assert status["cards"]["brain_tumor/student"]["entry"]["update"] == why
        # Loaded, refused: its downloaded files are gone; only the serving version's remain.
        serving = Path(store.get("brain_tumor").folder)
        assert [p.name for p in serving.parent.iterdir()] == [serving.name]
        # A version that does not load: refused once, not loaded again at every poll.
        assert _register(tracker, tmp_path, 4, broken=True) == "4"
        assert store.refresh() == []
        assert "v4 (@champion) not swapped in" in store.swaps()["brain_tumor/student"]
        assert store.refresh() == []  # the refused version is not tried again
        # The alias moves on to a good version: swapped in.
        assert _register(tracker, tmp_path, 5) == "5"
        assert store.refresh() and store.get("brain_tumor").registered.version == "5"
        for _ in range(200):  # the client's next answers come from v5
            if answers and answers[-1][0] == "5":
                break
            stop.wait(0.05)
    finally:
        stop.set()
        thread.join()
        store.close()
    assert not failures, failures[:3]
    versions = [v for v, _ in answers]
    assert versions[-1] == "5" and "3" not in versions and "4" not in versions
    assert versions == sorted(versions, key=int)  # never back to an older one


def test_the_replica_polls_the_registry_by_itself(tmp_path):
    ws = Workspace(tmp_path / "ws").create()
    tracker = Tracker.open(MLflowConfig(), ws)
    _register(tracker, tmp_path, 1)
    store = ModelStore(
        tracker.tracking_uri, ["brain_tumor"], "champion", ("student",), reload_interval_s=0.2
    )
    try:
        _register(tracker, tmp_path, 2)
        deadline = threading.Event()
        for _ in range(100):
            if store.get("brain_tumor").registered.version == "2":
                break
            deadline.wait(0.1)
        assert store.get("brain_tumor").registered.version == "2"
    finally:
        store.close()
