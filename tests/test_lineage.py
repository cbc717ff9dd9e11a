"""A model knows what it saw: its data record, and the post-run commands' config taken from it.

Unit tests on a registered toy model (real MLflow, SQLite; no Ray); the commands themselves on the
smoke run's workspace are in tests/test_post_run.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kdray.config import ConfigError, MLflowConfig, load_config
from kdray.data.prepare import prepare_dataset, prepare_manifest, synthetic_root
from kdray.data.record import DataRecord, DataSource, record_for, save_record
from kdray.data.specs import get_spec
from kdray.lineage import LineageError, check_manifest, model_lineage, post_run_config
from kdray.models import ModelSpec, build_model, save_model
from kdray.registry import log_model_folder, register_model, registered_name
from kdray.tracking import Tracker, resolve_tracking_uri
from kdray.workspace import Workspace

DATASET = "brain_tumor"
DEFAULT = str(Path(__file__).resolve().parent.parent / "configs" / "default.yaml")
TINY = [
    "data.image_size=32",
    "data.synthetic.n_per_class=8",
    "data.synthetic.size=32",
    f"data.datasets=[{DATASET}]",
]


def _register(ws: Workspace, overrides: list[str], with_record: bool = True):
    """A champion as the pipeline registers one: the run's config logged, the model folder with
    its data record, a version under kdray-<dataset>@champion."""
    cfg = load_config(None, overrides)
    data = prepare_dataset(cfg.data, DATASET, ws)
    tracker = Tracker.open(cfg.mlflow, ws)
    run_id = tracker.start_run("champion", DATASET, "champion")
    tracker.log_config(run_id, cfg.to_dict())
    spec = ModelSpec(
        kind="student",
        num_classes=4,
        image_size=cfg.data.image_size,
        class_names=list(get_spec(DATASET).classes),
        widths=[4, 8],
        dataset=DATASET,
    )
    folder = save_model(build_model(spec), spec, ws.root / "champ")
    record = record_for(cfg.data, data, student=True)
    if with_record:
        save_record(folder, record)
    log_model_folder(tracker.client, run_id, folder)
    register_model(tracker.client, registered_name(DATASET), run_id, "champion")
    shutil.rmtree(folder)
    return cfg, data, record, run_id


def test_the_stand_ins_own_folder_is_told_from_a_real_one(workspace):
    """The layout prepare writes (<ws>/data/synthetic/<id>-n..-s..-seed../images), not a
    hand-written path: the stand-in is recognised with its parameters."""
    cfg = load_config(None, TINY)
    manifest = prepare_manifest(cfg.data, DATASET, workspace)
    assert manifest.root == str(synthetic_root(cfg.data, DATASET, workspace) / "images")
    source = DataSource.from_root(manifest.root)
    assert source == DataSource("synthetic", n_per_class=8, size=32, seed=0)
    assert source == DataSource.from_config(cfg.data, DATASET)
    assert source.describe() == "synthetic stand-in (8 images per class generated at 32 px, seed 0)"
    real = DataSource.from_root("/data/brain-tumor-mri-dataset")
    assert not real.synthetic and real.describe() == "folder `brain-tumor-mri-dataset`"
    assert "/data" not in str(real.public())


def test_the_split_digest_follows_the_files_not_where_they_are(workspace, tmp_path):
    cfg = load_config(None, TINY)
    data = prepare_dataset(cfg.data, DATASET, workspace)
    record = record_for(cfg.data, data, student=True)
    copy = tmp_path / "copy"
    shutil.copytree(data.manifest.root, copy)
    moved = prepare_manifest(
        load_config(None, [*TINY, f"data.roots={{{DATASET}: {copy}}}"]).data, DATASET, workspace
    )
    assert moved.fingerprint != data.manifest.fingerprint  # the fingerprint knows the place
    lineage = _lineage(record)
    check_manifest(moved, lineage)  # the same files elsewhere: the model's data
    (copy / "Training" / "glioma" / "glioma_00000.png").unlink()
    changed = prepare_manifest(
        load_config(None, [*TINY, f"data.roots={{{DATASET}: {copy}}}"]).data, DATASET, workspace
    )
    with pytest.raises(LineageError, match="split digest") as err:
        check_manifest(changed, lineage)
    assert record.digest in str(err.value)


def _lineage(record: DataRecord):
    from kdray.lineage import Lineage

    return Lineage("kdray-brain_tumor", "champion", "1", "r" * 32, record, {})


def test_contradictions_name_each_key_with_both_values(workspace):
    cfg = load_config(None, TINY)
    record = record_for(cfg.data, prepare_dataset(cfg.data, DATASET, workspace), student=True)
    assert record.contradictions(cfg.data) == []
    default = load_config(None, [])
    assert record.contradictions(default.data) == [
        ("data.image_size", 32, 64),
        ("data.synthetic.n_per_class", 8, 300),
        ("data.synthetic.size", 32, 96),
    ]
    real = load_config(None, [*TINY, "data.roots={brain_tumor: /data/x}", "data.split_seed=3"])
    assert record.contradictions(real.data) == [
        ("data.roots.brain_tumor", record.describe(), "folder `x`"),
        ("data.split_seed", 0, 3),
    ]
    # The student's share of the training split is what it saw, in the record.
    assert 0 < record.train_images < record.counts["train"]
    assert (
        record_for(cfg.data, prepare_dataset(cfg.data, DATASET, workspace), False).train_images
        == (record.counts["train"])
    )


def test_a_post_run_command_takes_the_models_config_and_refuses_other_data(workspace):
    run_cfg, data, record, run_id = _register(workspace, TINY)
    uri = resolve_tracking_uri(MLflowConfig(), workspace)
    lineage = model_lineage(registered_name(DATASET), "champion", uri)
    assert lineage.record == record and lineage.run_id == run_id  # read back as written

    # No --config: the run's own config (32 px, the tiny stand-in), --set on top.
    cfg, found = post_run_config(None, ["explain.top_k_channels=2"], workspace, DATASET, "champion")
    assert cfg.data == run_cfg.data and cfg.explain.top_k_channels == 2
    assert found.version == lineage.version

    # A config at hand that would give the model other data: one message, both values, the way out.
    with pytest.raises(LineageError) as err:
        post_run_config(DEFAULT, [], workspace, DATASET, "champion", way_out="or X")
    text = str(err.value)
    assert (
        "kdray-brain_tumor v1 (@champion) was trained on the synthetic stand-in (8 images" in text
    )
    assert f"--config {DEFAULT} gives it other data" in text
    assert "data.image_size: 64 (the model's: 32)" in text
    assert "data.synthetic.n_per_class: 300 (the model's: 8)" in text
    assert "leave out --config" in text and text.endswith("; or X")
    with pytest.raises(LineageError, match=r"--set gives it other data:\n  data.image_size: 48"):
        post_run_config(None, ["data.image_size=48"], workspace, DATASET, "champion")
    # Not checked where the command reads the user's own folder instead (audit --root).
    cfg, _ = post_run_config(DEFAULT, [], workspace, DATASET, "champion", check_data=False)
    assert cfg.data.image_size == 64
    with pytest.raises(ConfigError, match="student.depth"):
        post_run_config(None, ["student.depth=9"], workspace, DATASET, "champion")


def test_a_version_registered_before_records_is_described_from_its_runs_config(workspace):
    run_cfg, _, record, _ = _register(workspace, TINY, with_record=False)
    uri = resolve_tracking_uri(MLflowConfig(), workspace)
    lineage = model_lineage(registered_name(DATASET), "champion", uri)
    assert lineage.record.digest == ""  # nothing to check the files against
    assert lineage.record.source == record.source and lineage.record.image_size == 32
    with pytest.raises(LineageError, match="data.image_size: 64"):
        post_run_config(DEFAULT, [], workspace, DATASET, "champion")
