"""The dataset audit (tune/audit.py, kdray.audit): Ray Data over every image, student and teacher.

The scoring and the look-first rules are tested on constructed cases without Ray; the pipeline
runs on the smoke run's registry (its test split against its report and the serving path, a
Kaggle-layout folder with broken files while an actor dies, an unlabelled folder through the
command line). The 2-node cluster test (tests/test_cluster.py) audits with actors on both nodes.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import REPO, tiny_data

SIZE = 32
CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]


def _student(seed: int):
    from kdray.models import ModelSpec, build_model

    torch.manual_seed(seed)
    spec = ModelSpec(
        kind="student",
        num_classes=4,
        image_size=SIZE,
        class_names=CLASSES,
        widths=[4, 8, 8],
        dataset="brain_tumor",
    )
    return build_model(spec).eval(), spec


def _files(model, spec, tmp_path: Path):
    from kdray.models import model_files, save_model

    folder = tmp_path / f"model-{id(model)}"
    save_model(model, spec, folder)
    return model_files(folder)


def _png(array: np.ndarray, path: Path) -> str:
    Image.fromarray(array).save(path)
    return str(path)


def _batch(items: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.array([it[k] for it in items]) for k in items[0]}


def _item(i: int, path: str, label: int, mask: str = "") -> dict:
    return {
        "index": i,
        "path": path,
        "name": Path(path).name,
        "split": "test",
        "label": label,
        "mask": mask,
        "shap": False,
    }


def test_each_look_first_rule_catches_its_constructed_case(tmp_path):
    """A flipped label, a mask moved off the map, a teacher that disagrees, a broken file: each
    lands in its own list, ranked; a teacher identical to the student agrees on every map."""
    from kdray.audit.cases import aggregates, look_first
    from kdray.audit.scorer import Settings, load_audit_model, score_batch
    from kdray.config import ExplainConfig
    from kdray.explain.gradcam import grad_cam

    data = tiny_data("brain_tumor", n_per_class=4, size=SIZE)
    images = data.splits["train"].images[:8]
    student, spec = _student(0)
    cfg = ExplainConfig()
    s = load_audit_model("student", _files(student, spec, tmp_path), None, cfg)
    settings = Settings(explain=cfg)
    paths = [_png(im.transpose(1, 2, 0), tmp_path / f"im{i}.png") for i, im in enumerate(images)]
    x = torch.from_numpy(images).float() / 255
    preds = student(x).argmax(1).numpy()
    cams = grad_cam(student, images, s.layer, preds).maps
    lit = [i for i in range(len(images)) if np.ptp(cams[i]) > 0]
    assert lit, "no image with a non-blank Grad-CAM to move a mask against"
    k = lit[0]
    on = cams[k] >= np.quantile(cams[k], 0.9)  # the map's top 10 %
    off = cams[k] <= np.quantile(cams[k], 0.1)  # its bottom 10 %
    mask_on = _png(on.astype(np.uint8) * 255, tmp_path / "on.png")
    mask_off = _png(off.astype(np.uint8) * 255, tmp_path / "off.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    flipped = 3
    items = [_item(i, p, int(preds[i])) for i, p in enumerate(paths)]  # all right...
    items[flipped]["label"] = int((preds[flipped] + 1) % 4)  # ...but one
    items += [
        _item(8, paths[k], int(preds[k]), mask_on),
        _item(9, paths[k], int(preds[k]), mask_off),  # the same image, the mask moved off
        _item(10, str(tmp_path / "broken.png"), 0),
    ]

    # A teacher identical to the student: the same labels, the same maps.
    twin = load_audit_model("teacher", _files(student, spec, tmp_path), None, cfg)
    df = score_batch([s, twin], _batch(items), settings).to_pandas()
    ok = df[df["error"] == ""]
    assert ok["agree"].all()
    lit_rows = ok[ok["index"].isin(lit)]
    assert np.allclose(lit_rows["maps_rank_gradcam"], 1.0)
    assert np.allclose(lit_rows["maps_iou_gradcam"], 1.0)

    # A teacher forced to one class: it disagrees exactly where the student says another.
    biased, _ = _student(0)
    with torch.no_grad():
        biased.head.bias[2] += 50.0
    teacher = load_audit_model("teacher", _files(biased, spec, tmp_path), None, cfg)
    df = score_batch([s, teacher], _batch(items), settings).to_pandas()
    assert len(df) == 11 and (df["index"] == range(11)).all()
    cases = {c.kind: c for c in look_first(df, CLASSES, top=20)}

    assert [r["index"] for r in cases["confident_wrong"].rows] == [flipped]
    assert "truth" in cases["confident_wrong"].rows[0]["why"]

    # The same image and answer: with the mask moved off the map it is listed, on target not.
    assert [r["index"] for r in cases["right_outside_lesion"].rows] == [9]
    energy = df.set_index("index")["student_gradcam_energy"]
    assert energy[9] < energy[8]
    assert df.set_index("index")["student_gradcam_pointing"][8] == 1.0

    disagree = {r["index"] for r in cases["disagree"].rows}
    expected = set(df[(df["error"] == "") & (df["student_label"] != 2)]["index"])
    assert disagree == expected and (df[df["error"] == ""]["teacher_label"] == 2).all()

    ranks = [
        df.set_index("index")["maps_rank_gradcam"][r["index"]] for r in cases["maps_disagree"].rows
    ]
    assert ranks == sorted(ranks) and all(r < 0 for r in ranks)
    assert len(ranks) == cases["maps_disagree"].matched == (df["maps_rank_gradcam"] < 0).sum()

    assert [(r["index"], r["name"]) for r in cases["unreadable"].rows] == [(10, "broken.png")]
    assert cases["unreadable"].rows[0]["why"]  # the decoder's reason
    broken = df.set_index("index").loc[10]
    assert broken["student_label"] == -1 and np.isnan(broken["student_confidence"])

    m = aggregates(df, CLASSES, ["feature_maps", "gradcam"])
    assert m["images"] == 11 and m["unreadable"] == 1 and m["with_mask"] == 2
    assert m["student.accuracy"] == pytest.approx(9 / 10)  # the broken file is not scored
    assert m["agreement.predictions"] == pytest.approx(1 - len(expected) / 10)


def _kaggle_folder(ws_root: Path, root: Path) -> int:
    """A Training/Testing layout from the smoke stand-in's brain_tumor images, with a broken
    file, an empty one, a 16-bit PNG and a JPEG among the Testing images; returns the readable
    count."""
    src = next((ws_root / "data" / "synthetic").glob("brain_tumor-*")) / "images"
    n = 0
    for part in ("Training", "Testing"):
        for cls in CLASSES:
            dest = root / part / cls
            dest.mkdir(parents=True)
            for path in sorted((src / part / cls).glob("*.png"))[:2]:
                shutil.copy(path, dest / path.name)
                n += 1
    test = root / "Testing" / "glioma"
    (test / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (test / "empty.jpg").write_bytes(b"")
    deep = (np.arange(48 * 48, dtype=np.uint16).reshape(48, 48) * 20).astype(np.uint16)
    Image.fromarray(deep).save(test / "deep16.png")
    buf = io.BytesIO()
    Image.open(next(test.glob("glioma_*.png"))).convert("RGB").save(buf, format="JPEG")
    (test / "photo.jpg").write_bytes(buf.getvalue())
    return n + 2


def test_an_unlabelled_folder_is_audited_without_accuracy(tmp_path):
    """No class folders: every file (broken ones too) listed with label -1; agreement and
    confidence are scored, accuracy and the truth-based lists are not."""
    from kdray.audit.cases import aggregates, look_first
    from kdray.audit.scorer import Settings, load_audit_model, score_batch
    from kdray.audit.sources import folder_source, mark_shap
    from kdray.config import ExplainConfig
    from kdray.data.specs import get_spec

    folder = tmp_path / "incoming" / "week1"
    folder.mkdir(parents=True)
    images = tiny_data("alzheimer", n_per_class=2, size=SIZE).splits["train"].images
    for i, image in enumerate(images[:4]):
        _png(image.transpose(1, 2, 0), folder / f"scan{i}.png")
    (folder / "notes.png").write_text("not an image")
    (folder / "readme.txt").write_text("not listed: no image suffix")
    source = folder_source(get_spec("alzheimer"), tmp_path / "incoming")
    assert not source.labelled and len(source.items) == 5
    assert {it.label for it in source.items} == {-1} and {it.split for it in source.items} == {
        "all"
    }
    assert mark_shap(source, 2, seed=0) == 2 and sum(it.shap for it in source.items) == 2

    student, spec = _student(0)
    cfg = ExplainConfig()
    models = [
        load_audit_model("student", _files(student, spec, tmp_path), None, cfg),
        load_audit_model("teacher", _files(_student(1)[0], spec, tmp_path), None, cfg),
    ]
    df = score_batch(models, _batch(source.rows()), Settings(explain=cfg)).to_pandas()
    m = aggregates(df, list(spec.class_names), ["feature_maps", "gradcam"])
    assert m["images"] == 5 and m["unreadable"] == 1 and m["labelled"] == 0
    assert "student.accuracy" not in m and "student.ece" not in m
    assert "agreement.predictions" in m and "student.confidence" in m
    cases = {c.kind: c for c in look_first(df, list(spec.class_names))}
    assert cases["confident_wrong"].matched == 0 and "unlabelled" in cases["confident_wrong"].rule
    assert cases["right_outside_lesion"].matched == 0
    assert [r["name"] for r in cases["unreadable"].rows] == ["week1/notes.png"]


def test_a_kaggle_layout_is_listed_with_its_labels_split_and_masks(tmp_path):
    from kdray.audit.sources import folder_source
    from kdray.data.folders import DataError
    from kdray.data.specs import get_spec

    root = tmp_path / "kaggle"
    src = tmp_path / "src"
    from kdray.data import synthetic

    synthetic.generate("brain_tumor", src / "images", src / "masks", 3, 48, 0)
    shutil.copytree(src / "images", root)
    (root / "Testing" / "glioma" / "broken.png").write_bytes(b"nope")
    spec = get_spec("brain_tumor")
    every = folder_source(spec, root, src / "masks")
    assert every.labelled and {it.split for it in every.items} == {"train", "test"}
    for it in every.items:
        assert it.label == CLASSES.index(it.name.split("/")[1])
        assert bool(it.mask) == (it.name != "Testing/glioma/broken.png")  # the mask tree mirrors it
    test = folder_source(spec, root, split="test")
    assert {it.split for it in test.items} == {"test"} and not any(it.mask for it in test.items)
    with pytest.raises(DataError, match="val"):
        folder_source(spec, root, split="val")
    with pytest.raises(DataError, match="no such folder"):
        folder_source(spec, tmp_path / "nope")


@pytest.mark.integration
def test_the_test_split_audit_matches_the_report_the_registry_and_the_server(
    smoke_run, smoke_audit
):
    """The smoke run's test split, while the actor died after two batches had come back: every row
    there once (none lost, none doubled by the retry), the report's numbers, the service's
    predictions, and the MLflow run."""
    from mlflow import MlflowClient

    from kdray.audit.run import audit_experiment
    from kdray.config import load_config
    from kdray.data.images import read_image
    from kdray.serving.deployments import BatchPredictor
    from kdray.serving.store import ModelStore
    from kdray.tracking import resolve_tracking_uri
    from kdray.workspace import Workspace

    result, marker = smoke_audit
    # The actor died mid-audit, after two batches had come back: Ray Data restarted it and
    # retried the batch it held, and only that one.
    assert int(marker.read_text()) == 2
    cfg = load_config(REPO / "configs" / "smoke.yaml", [])
    ws = Workspace.at(smoke_run[0])
    dataset = result.dataset
    df = pd.read_parquet(result.table)  # plain Parquet: pandas reads it without Ray
    report = json.loads((ws.reports / dataset / "report.json").read_text())["metrics"]
    test_entries = [
        e
        for e in json.loads(next(ws.manifests.glob(f"{dataset}-*.json")).read_text())["entries"]
        if e["split"] == "test"
    ]
    assert len(df) == len(test_entries) == result.metrics["readable"]  # no row lost
    assert sorted(df["index"]) == list(range(len(df))) and (df["error"] == "").all()
    m = result.metrics
    # The report's definitions, on the same split: accuracy exactly, the rest to float noise.
    for role in ("student", "teacher"):
        assert m[f"{role}.accuracy"] == report[f"{role}.accuracy_test"]
        assert m[f"{role}.ece"] == pytest.approx(report[f"{role}.ece"], abs=1e-6)
        for method in ("feature_maps", "gradcam"):
            assert m[f"{role}.pointing_game.{method}"] == pytest.approx(
                report[f"{role}.localisation_test.{method}"], abs=1e-9
            )
    assert m["agreement.predictions"] == report["agreement.predictions_test"]
    assert m["with_mask"] == report["localisation_test.images"]

    # The serving path (the Gateway's store and batch predictor: onnxruntime) on the same files.
    store = ModelStore(
        resolve_tracking_uri(cfg.mlflow, ws), [dataset], "champion", ("student",), runtime="onnx"
    )
    try:
        assert store.get(dataset).onnx is not None
        size = store.get(dataset).image_size
        images = [read_image(Path(p).read_bytes(), size) for p in df["path"]]
        served = np.array(BatchPredictor(store)._forward([dataset] * len(images), images))
    finally:
        store.close()
    assert (served.argmax(1) == df["student_label"].to_numpy()).all()
    assert np.abs(served - np.stack(df["student_probs"])).max() < 1e-4

    # Logged: the run, its metrics and artifacts, the per-image table, the version's link to it.
    client = MlflowClient(resolve_tracking_uri(cfg.mlflow, ws))
    run = client.get_run(result.run_id)
    assert client.get_experiment(run.info.experiment_id).name == audit_experiment(cfg)
    assert run.data.params["model.student"] == result.versions["student"]
    assert run.data.metrics["student.accuracy"] == m["student.accuracy"]
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"audit.parquet", "audit.md", "audit.json", "audit_table.json"} <= artifacts
    name, version = result.versions["student"].split("/")
    assert client.get_model_version(name, version).tags["kdray.audit.last_run"] == result.run_id
    markdown = result.markdown.read_text()
    for title in ("Student confident and wrong", "Teacher and student maps disagree most"):
        assert title in markdown
    pictures = sorted((result.out_dir / "thumbs").glob("*.png"))
    listed = {r["index"] for c in result.cases if c.kind != "unreadable" for r in c.rows}
    assert listed and {int(p.stem) for p in pictures} == listed  # one per row listed
    for picture in pictures:
        assert Image.open(picture).size[0] >= 96 * 3  # input, student, teacher side by side
    assert "MapBatches(CrashOnce)" in result.stats


@pytest.mark.integration
def test_the_command_audits_a_kaggle_folder_with_broken_files_and_names_bad_input(
    smoke_run, ray_local, tmp_path, capsys
):
    from kdray.audit.cli import audit_main

    ws, _ = smoke_run
    readable = _kaggle_folder(ws, tmp_path / "kaggle")
    base = ["--workspace", str(ws)]  # no --config: the models' own run config

    assert audit_main([*base, "--dataset", "brain_tumor", "--root", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert audit_main([*base, "--dataset", "brain_tumor", "--alias", "gone", "--no-log"]) == 2
    assert "kdray-brain_tumor@gone" in capsys.readouterr().err
    assert audit_main([*base, "--dataset", "brain_tumor", "--methods", "lime"]) == 2
    assert "lime" in capsys.readouterr().err

    out = tmp_path / "audit"
    argv = [*base, "--dataset", "brain_tumor", "--root", str(tmp_path / "kaggle"), "-v"]
    argv += ["--out", str(out), "--methods", "gradcam,shap", "--shap-sample", "3", "--no-log"]
    argv += ["--student-only", "--actors", "1"]
    assert audit_main(argv) == 0
    printed = capsys.readouterr().out
    assert f"{readable + 2} images, 2 unreadable" in printed and "Unreadable files: 2" in printed
    df = pd.read_parquet(out / "audit.parquet")
    bad = df[df["error"] != ""].set_index("name")["error"].to_dict()
    assert set(bad) == {"Testing/glioma/broken.png", "Testing/glioma/empty.jpg"}
    assert "empty" in bad["Testing/glioma/empty.jpg"]
    assert set(df["split"]) == {"train", "test"}  # the layout's own split, labels from folders
    readable_rows = df[df["error"] == ""]
    assert len(readable_rows) == readable
    assert (
        readable_rows["label"]
        == readable_rows["name"].map(lambda n: CLASSES.index(n.split("/")[1]))
    ).all()
    shap = df[df["student_shap"] != b""]
    # The seeded sample of 3 (the config's seed), less the broken files it drew.
    sampled = set(np.random.default_rng(0).permutation(len(df))[:3].tolist())
    expected = df[df["index"].isin(sampled) & (df["error"] == "")]
    assert sorted(shap["index"]) == sorted(expected["index"]) and len(expected) >= 1
    assert shap["student_shap_scale"].gt(0).all()
    assert "Testing/glioma/broken.png" in (out / "audit.md").read_text()
