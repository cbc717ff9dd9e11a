"""Registered kdray models: standard MLflow pyfunc loading (models from code) and kdray's loader."""

from __future__ import annotations

import json

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


def test_a_registered_model_says_what_it_trained_on_from_its_own_record(tmp_path):
    """The model card's "trained on", title and data come from the version's own data record,
    made from data laid out as `prepare` lays it out (the stand-in's folder in the workspace, a
    real copy anywhere): a model of the stand-in says so with its generator's parameters, a real
    folder is named, and no public answer carries a server path. A version registered before
    records is described from its run's dataset inputs the same way."""
    from kdray.config import DataConfig
    from kdray.data.mlflow_inputs import split_inputs
    from kdray.data.prepare import prepare_dataset
    from kdray.data.record import record_for, save_record
    from kdray.data.synthetic import generate
    from kdray.registry import fetch_registered
    from kdray.serving.deployments import card_title, model_entry
    from kdray.serving.store import LoadedModel

    ws = Workspace(tmp_path / "ws").create()
    tracker = Tracker.open(MLflowConfig(), ws)
    spec = _student_spec([4, 8])
    real_root = tmp_path / "brain-tumor-mri-dataset"
    generate("brain_tumor", real_root, tmp_path / "masks", 8, 32, 1)
    synthetic = DataConfig(image_size=32, synthetic={"n_per_class": 8, "size": 32, "seed": 0})
    real = DataConfig(image_size=32, roots={"brain_tumor": str(real_root)})
    cards = {}
    for kind, cfg in (("synthetic", synthetic), ("real", real)):
        data = prepare_dataset(cfg, "brain_tumor", ws)
        for with_record in (True, False):
            name = f"kdray-{kind}-{with_record}"
            folder = save_model(build_model(spec), spec, tmp_path / name)
            if with_record:
                save_record(folder, record_for(cfg, data, student=True))
            run_id = tracker.start_run("champion", "brain_tumor", "champion")
            tracker.log_inputs(
                run_id, split_inputs(data.for_students(cfg.student_fraction("brain_tumor"), 0))
            )
            log_model_folder(tracker.client, run_id, folder)
            register_model(tracker.client, name, run_id, "champion")
            reg = fetch_registered(name, "champion", tmp_path / f"{name}-dl", tracker.tracking_uri)
            loaded = LoadedModel("brain_tumor", "student", reg, build_model(spec), None)
            cards[kind, with_record] = (reg, card_title(loaded), model_entry(loaded))
    stand_in = prepare_dataset(synthetic, "brain_tumor", ws)
    assert stand_in.manifest.root.startswith(str(ws.root))  # the layout prepare writes
    n_train = len(stand_in.splits["train"])
    seen = len(stand_in.student_indices(0.25, 0))

    for with_record in (True, False):
        reg, title, entry = cards["synthetic", with_record]
        assert reg.trained_on["synthetic"] and title == "Brain Tumor MRI · synthetic stand-in"
        text = reg.trained_on["text"]
        assert text.startswith("synthetic stand-in (8 images per class generated at 32 px, seed 0)")
        assert "not the public dataset" in text and "Kaggle" not in text
        # The record counts what the students saw; an older version's inputs give the setting.
        share = f"{seen / n_train:.0%}" if with_record else "25%"
        assert text.endswith(f": {seen} training images ({share} of the training split)")
        reg, title, entry = cards["real", with_record]
        assert not reg.trained_on["synthetic"]
        assert title == "Brain Tumor MRI · brain-tumor-mri-dataset"
        assert "folder `brain-tumor-mri-dataset`" in reg.trained_on["text"]
    # The record itself: in the card, public (the folder's name, no server path anywhere).
    reg, _, entry = cards["real", True]
    assert reg.record is not None and reg.record.source.root == str(real_root)
    assert entry["data"]["source"] == {"kind": "folder", "folder": real_root.name, "masks": False}
    assert entry["data"]["image_size"] == 32 and entry["data"]["digest"] == reg.record.digest
    for key in cards:
        assert str(tmp_path) not in json.dumps(cards[key][2])
    assert cards["real", False][2]["data"] == {}  # no record: nothing invented
