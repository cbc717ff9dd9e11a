"""Registered kdray models: standard MLflow pyfunc loading (models from code) and kdray's loader."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from kdray.config import MLflowConfig
from kdray.engine import predict_logits, softmax
from kdray.models import ModelSpec, build_model, save_model
from kdray.registry import load_registered, log_model_folder, register_model
from kdray.tracking import Tracker
from kdray.workspace import Workspace

CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]


def _student_spec(widths: list[int]) -> ModelSpec:
    return ModelSpec(
        kind="student",
        num_classes=4,
        image_size=32,
        class_names=CLASSES,
        widths=widths,
        dataset="brain_tumor",
    )


@pytest.fixture()
def registered(tmp_path):
    ws = Workspace(tmp_path / "ws").create()
    tracker = Tracker.open(MLflowConfig(), ws)
    spec = _student_spec([4, 8, 8])
    torch.manual_seed(0)
    model = build_model(spec).eval()
    folder = save_model(model, spec, tmp_path / "student")
    run_id = tracker.start_run("champion", "brain_tumor", "champion")
    log_model_folder(tracker.client, run_id, folder)
    register_model(tracker.client, "kdray-brain_tumor", run_id, "champion")
    return tracker.tracking_uri, model


@pytest.fixture()
def global_tracking_uri():
    """Point MLflow's process-wide tracking URI (and $MLFLOW_TRACKING_URI, which MLflow sets with
    it) somewhere for one test, then back: later tests must not inherit it."""
    import os

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    yield mlflow.set_tracking_uri
    mlflow.set_tracking_uri(previous)


def test_pyfunc_loads_a_champion_by_alias_and_predicts_probabilities(
    registered, global_tracking_uri
):
    uri, model = registered
    global_tracking_uri(uri)
    pyfunc = mlflow.pyfunc.load_model("models:/kdray-brain_tumor@champion")
    inputs = pyfunc.metadata.get_input_schema().inputs
    assert inputs[0].type == np.dtype(np.uint8) and inputs[0].shape == (-1, -1, -1, 3)
    assert pyfunc.metadata.get_output_schema().input_names() == CLASSES
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)  # not the model's 32 px
    out = pyfunc.predict(images)
    assert list(out.columns) == CLASSES and len(out) == 3
    np.testing.assert_allclose(out.to_numpy().sum(1), 1.0, rtol=1e-5)
    # The same numbers as kdray's own path: bilinear resize to 32 px, then the model.
    resized = np.stack(
        [
            np.asarray(Image.fromarray(im).resize((32, 32), Image.Resampling.BILINEAR))
            for im in images
        ]
    ).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(out.to_numpy(), softmax(predict_logits(model, resized)), atol=1e-5)
    with pytest.raises(Exception, match="does not match expected shape"):  # the signature, enforced
        pyfunc.predict(rng.integers(0, 256, (2, 32, 32, 4), dtype=np.uint8))


def test_kdrays_loader_still_reads_the_registered_folder(registered):
    uri, model = registered
    loaded, spec = load_registered("kdray-brain_tumor", "champion", tracking_uri=uri)
    assert spec.class_names == CLASSES
    x = np.random.default_rng(1).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    np.testing.assert_allclose(predict_logits(loaded, x), predict_logits(model, x), atol=1e-6)
    folder = MlflowClient(uri).get_model_version_by_alias("kdray-brain_tumor", "champion").source
    assert folder.endswith("/model")


def test_a_registered_model_says_what_it_trained_on_from_its_own_run(tmp_path):
    """The model card's "trained on" and title come from the registering run's dataset inputs:
    a model of the synthetic stand-in says so, whatever the catalogue calls the dataset."""
    from kdray.data.mlflow_inputs import split_inputs
    from kdray.data.prepare import in_memory_synthetic
    from kdray.registry import fetch_registered
    from kdray.serving.deployments import card_title
    from kdray.serving.store import LoadedModel

    ws = Workspace(tmp_path / "ws").create()
    tracker = Tracker.open(MLflowConfig(), ws)
    spec = _student_spec([4, 8])
    data = in_memory_synthetic("brain_tumor", 8, 32)
    synthetic_root = str(ws.root / "data" / "synthetic" / "brain_tumor-n8-s32-seed0")
    real_root = "/data/brain-tumor-mri-dataset"
    cards = {}
    for root, name in ((synthetic_root, "kdray-brain_tumor"), (real_root, "kdray-other")):
        data.manifest.root = root
        data.manifest.fingerprint = f"{abs(hash(root)):016x}"  # other files, another digest
        students = data.for_students(0.5, 0)
        run_id = tracker.start_run("champion", "brain_tumor", "champion")
        tracker.log_inputs(run_id, split_inputs(students))
        log_model_folder(
            tracker.client, run_id, save_model(build_model(spec), spec, tmp_path / name)
        )
        register_model(tracker.client, name, run_id, "champion")
        reg = fetch_registered(name, "champion", tmp_path / f"{name}-dl", tracker.tracking_uri)
        cards[root] = (
            reg.trained_on,
            card_title(LoadedModel("brain_tumor", "student", reg, None, None)),
        )
    n = len(students.splits["train"])
    trained, title = cards[synthetic_root]
    assert trained["synthetic"] and trained["images"] == n
    assert (
        trained["text"].startswith("synthetic stand-in for Brain Tumor MRI (Kaggle")
        and "50%" in trained["text"]
    )
    assert title == "Brain Tumor MRI · synthetic stand-in"
    trained, title = cards[real_root]
    assert not trained["synthetic"] and real_root in trained["text"]
    assert title == "Brain Tumor MRI · brain-tumor-mri-dataset"
