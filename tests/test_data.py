from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdray.config import DataConfig
from kdray.data.folders import DataError, read_image, scan_folder
from kdray.data.mlflow_inputs import split_inputs
from kdray.data.prepare import build_manifest, prepare_dataset, stratified_split
from kdray.data.specs import get_spec, normalise_name

from conftest import tiny_data


def _write(path: Path, mode: str = "L", size=(40, 30), value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        Image.fromarray(np.full(size[::-1], value * 200, dtype=np.uint16)).save(path)
    else:
        Image.new(mode, size, value if mode == "L" else (value, 10, 200)).save(path)


def _tree(root: Path, folders: list[str], per_class: int = 5, ext: str = ".png", mode="L") -> None:
    for folder in folders:
        for i in range(per_class):
            _write(root / folder / f"img_{i}{ext}", mode=mode, value=10 + i)


def test_name_normalisation():
    assert normalise_name("Mild_Demented") == normalise_name("MildDemented") == "milddemented"
    assert normalise_name("Very Mild-Demented") == "verymilddemented"


def test_train_test_layout_uses_the_own_test_folder(tmp_path):
    spec = get_spec("brain_tumor")
    _tree(tmp_path / "Training", list(spec.classes), per_class=6)
    _tree(tmp_path / "Testing", list(spec.classes), per_class=2)
    found = scan_folder(spec, tmp_path)
    assert set(found) == {"train", "test"}
    assert len(found["train"]) == 24 and len(found["test"]) == 8
    assert {label for _, label in found["test"]} == {0, 1, 2, 3}


def test_flat_layout_with_separator_variants_and_wrapper_folder(tmp_path):
    spec = get_spec("alzheimer")
    names = ["Non_Demented", "very_mild_demented", "MILD-DEMENTED", "Moderate Demented"]
    _tree(tmp_path / "Alzheimer_s Dataset", names, per_class=3)
    found = scan_folder(spec, tmp_path)
    assert list(found) == ["all"]
    labels = sorted({(Path(rel).parts[1], label) for rel, label in found["all"]})
    assert dict(labels) == {
        "Non_Demented": 0,
        "very_mild_demented": 1,
        "MILD-DEMENTED": 2,
        "Moderate Demented": 3,
    }


def test_lowercase_train_test_and_aliases(tmp_path):
    spec = get_spec("brain_tumor")
    old_names = ["glioma_tumor", "meningioma_tumor", "no_tumor", "pituitary_tumor"]
    _tree(tmp_path / "train", old_names, per_class=2)
    _tree(tmp_path / "test", old_names, per_class=1)
    found = scan_folder(spec, tmp_path)
    assert len(found["train"]) == 8 and len(found["test"]) == 4


def test_unknown_class_folder(tmp_path):
    spec = get_spec("eye_disease")
    _tree(tmp_path, [*spec.classes, "myopia"], per_class=1)
    with pytest.raises(DataError, match=r"unknown class folder\(s\) \['myopia'\]"):
        scan_folder(spec, tmp_path)


def test_missing_class_folder(tmp_path):
    spec = get_spec("eye_disease")
    _tree(tmp_path, ["cataract", "normal", "glaucoma"], per_class=1)
    with pytest.raises(DataError, match=r"missing class folder\(s\) \['diabetic_retinopathy'\]"):
        scan_folder(spec, tmp_path)


def test_missing_empty_and_imageless(tmp_path):
    spec = get_spec("eye_disease")
    with pytest.raises(DataError, match="does not exist"):
        scan_folder(spec, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        scan_folder(spec, tmp_path / "empty")
    _tree(tmp_path / "d", list(spec.classes), per_class=1)
    for f in (tmp_path / "d" / "glaucoma").iterdir():
        f.unlink()
    (tmp_path / "d" / "glaucoma" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="has no images"):
        scan_folder(spec, tmp_path / "d")


def test_images_of_any_kind_become_rgb_of_the_model_size(tmp_path):
    _write(tmp_path / "g.png", "L", (50, 20))
    _write(tmp_path / "c.jpg", "RGB", (17, 33))
    _write(tmp_path / "d.png", "I;16", (30, 30))
    for name in ("g.png", "c.jpg", "d.png"):
        arr = read_image(tmp_path / name, 24)
        assert arr.shape == (3, 24, 24) and arr.dtype == np.uint8
    gray = read_image(tmp_path / "g.png", 24)
    assert np.array_equal(gray[0], gray[1]) and np.array_equal(gray[1], gray[2])
    colour = read_image(tmp_path / "c.jpg", 24)
    assert colour[0].mean() != colour[2].mean()


def test_dicom_slice_is_read():
    from pydicom.data import get_testdata_file

    arr = read_image(get_testdata_file("MR_small.dcm", download=False), 32)
    assert arr.shape == (3, 32, 32) and arr.max() > arr.min()


def test_stratified_split_is_deterministic_and_stratified():
    labels = [i % 4 for i in range(200)]
    a = stratified_split(labels, {"test": 0.15, "val": 0.15}, seed=3)
    b = stratified_split(labels, {"test": 0.15, "val": 0.15}, seed=3)
    c = stratified_split(labels, {"test": 0.15, "val": 0.15}, seed=4)
    assert a == b and a != c
    for label in range(4):
        names = [s for s, lab in zip(a, labels, strict=True) if lab == label]
        assert names.count("test") == 8 and names.count("val") == 8


def test_students_train_on_a_stratified_seeded_share_of_the_training_split():
    data = tiny_data(n_per_class=40)  # 20 training images per class
    labels = data.splits["train"].labels
    rows = data.student_indices(0.25, seed=0)
    assert list(rows) == sorted(set(rows.tolist()))  # sorted rows, no repeats
    assert [int((labels[rows] == c).sum()) for c in range(4)] == [5, 5, 5, 5]
    assert np.array_equal(rows, data.student_indices(0.25, seed=0))
    assert not np.array_equal(rows, data.student_indices(0.25, seed=1))
    students = data.for_students(0.25, seed=0)
    train = students.splits["train"]
    assert np.array_equal(train.images, data.splits["train"].images[rows])
    assert np.array_equal(train.masks, data.splits["train"].masks[rows])
    assert (
        students.splits["val"] is data.splits["val"]
        and students.splits["test"] is data.splits["test"]
    )
    assert data.for_students(1.0, seed=0) is data
    assert np.array_equal(data.student_indices(1.0, seed=0), np.arange(len(labels)))


def test_a_tiny_class_keeps_one_image_for_the_students():
    data = tiny_data(n_per_class=4)  # 2 training images per class
    rows = data.student_indices(0.1, seed=0)
    assert sorted(data.splits["train"].labels[rows].tolist()) == [0, 1, 2, 3]


def test_the_students_training_split_is_its_own_mlflow_dataset():
    data = tiny_data(n_per_class=40)
    full = {d.dataset.name: d.dataset for d in split_inputs(data)}
    cut = {d.dataset.name: d.dataset for d in split_inputs(data.for_students(0.25, seed=0))}
    assert set(cut) == {"eye_disease-train-25%", "eye_disease-val", "eye_disease-test"}
    assert cut["eye_disease-train-25%"].digest != full["eye_disease-train"].digest
    assert cut["eye_disease-val"].digest == full["eye_disease-val"].digest
    profile = json.loads(cut["eye_disease-train-25%"].profile)
    assert profile["num_images"] == 20 and profile["student_fraction"] == 0.25


def test_a_class_too_small_for_every_split_is_named_in_a_warning(caplog):
    labels = [0] * 20 + [1] * 2  # class 1: two images for train, val and test
    with caplog.at_level("WARNING", logger="kdray"):
        names = stratified_split(
            labels, {"val": 0.2, "test": 0.2}, seed=0, names=["normal", "rare"]
        )
    assert "'rare' has only 2 image(s)" in caplog.text and "'normal'" not in caplog.text
    assert len([n for n, lab in zip(names, labels, strict=True) if lab == 1]) == 2


def test_manifest_is_written_once_and_stable(tmp_path, workspace):
    spec = get_spec("eye_disease")
    _tree(tmp_path / "eye", list(spec.classes), per_class=10, mode="RGB")
    cfg = DataConfig(datasets=["eye_disease"])
    m1 = build_manifest(spec, tmp_path / "eye", None, cfg, workspace)
    m2 = build_manifest(spec, tmp_path / "eye", None, cfg, workspace)
    assert m1.entries == m2.entries
    assert len(list(workspace.manifests.glob("eye_disease-*.json"))) == 1
    assert sum(m1.counts().values()) == 40 and min(m1.counts().values()) >= 4
    other = build_manifest(
        spec, tmp_path / "eye", None, cfg.model_copy(update={"split_seed": 1}), workspace
    )
    assert other.fingerprint != m1.fingerprint and other.entries != m1.entries


def test_prepare_real_folder(tmp_path, workspace):
    spec = get_spec("brain_tumor")
    _tree(tmp_path / "bt" / "Training", list(spec.classes), per_class=8)
    _tree(tmp_path / "bt" / "Testing", list(spec.classes), per_class=2)
    cfg = DataConfig(
        datasets=["brain_tumor"], roots={"brain_tumor": str(tmp_path / "bt")}, image_size=20
    )
    data = prepare_dataset(cfg, "brain_tumor", workspace)
    assert data.splits["test"].images.shape == (8, 3, 20, 20)
    assert len(data.splits["train"]) + len(data.splits["val"]) == 32
    assert data.splits["train"].masks is None
    again = prepare_dataset(cfg, "brain_tumor", workspace)  # from the array cache
    assert np.array_equal(again.splits["train"].images, data.splits["train"].images)


def test_prepare_synthetic_with_masks(workspace):
    cfg = DataConfig(
        datasets=["alzheimer"], image_size=32, synthetic={"n_per_class": 10, "size": 48, "seed": 0}
    )
    data = prepare_dataset(cfg, "alzheimer", workspace)
    assert data.manifest.counts() == {"train": 24, "val": 8, "test": 8}
    for split in data.splits.values():
        assert split.masks is not None and split.masks.shape == (len(split), 32, 32)
    assert set(data.splits["train"].labels.tolist()) == {0, 1, 2, 3}


def _brain_masks(images: Path, masks: Path, classes: list[str], ext: str = ".png") -> int:
    """A lesion mask (white square) for every image of ``classes``, same relative path."""
    n = 0
    for image in sorted(images.rglob("*.png")):
        rel = image.relative_to(images)
        if rel.parent.name in classes:
            mask = np.zeros((30, 40), np.uint8)
            mask[5:15, 10:20] = 255
            (masks / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save((masks / rel).with_suffix(ext))
            n += 1
    return n


def test_masks_only_for_the_lesion_classes_are_kept_per_image(tmp_path, workspace):
    """Real mask sets have none for healthy images: the others keep theirs."""
    spec = get_spec("brain_tumor")
    _tree(tmp_path / "bt" / "Training", list(spec.classes), per_class=8)
    _tree(tmp_path / "bt" / "Testing", list(spec.classes), per_class=2)
    tumours = [c for c in spec.classes if c != "notumor"]
    n_masks = _brain_masks(tmp_path / "bt", tmp_path / "masks", tumours, ext=".jpg")  # any format
    cfg = DataConfig(
        datasets=["brain_tumor"],
        roots={"brain_tumor": str(tmp_path / "bt")},
        masks_roots={"brain_tumor": str(tmp_path / "masks")},
        image_size=20,
    )
    data = prepare_dataset(cfg, "brain_tumor", workspace)
    assert sum("mask" in e for e in data.manifest.entries) == n_masks == 30
    notumor = spec.classes.index("notumor")
    for split in data.splits.values():
        assert split.masks is not None and split.masks.shape == (len(split), 20, 20)
        has = split.masks.any(axis=(1, 2))
        assert not has[split.labels == notumor].any()
        assert has[split.labels != notumor].all()
        assert not split.masks[has].all(axis=(1, 2)).any()  # a square, not the whole image


def test_masks_added_after_a_first_run_are_picked_up(tmp_path, workspace):
    spec = get_spec("brain_tumor")
    _tree(tmp_path / "bt" / "Training", list(spec.classes), per_class=6)
    _tree(tmp_path / "bt" / "Testing", list(spec.classes), per_class=2)
    roots = {"brain_tumor": str(tmp_path / "bt")}
    masks_roots = {"brain_tumor": str(tmp_path / "masks")}
    cfg = DataConfig(datasets=["brain_tumor"], roots=roots, masks_roots=masks_roots, image_size=20)
    first = prepare_dataset(cfg, "brain_tumor", workspace)  # the masks folder does not exist yet
    assert first.splits["test"].masks is None
    _brain_masks(tmp_path / "bt", tmp_path / "masks", ["glioma"])
    second = prepare_dataset(cfg, "brain_tumor", workspace)
    assert second.manifest.fingerprint != first.manifest.fingerprint  # new manifest and cache
    assert [e["path"] for e in second.manifest.entries] == [
        e["path"] for e in first.manifest.entries
    ]
    glioma = spec.classes.index("glioma")
    test = second.splits["test"]
    assert (
        test.masks is not None
        and test.masks.any(axis=(1, 2)).tolist() == (test.labels == glioma).tolist()
    )


def test_an_unreadable_mask_is_a_clear_error(tmp_path, workspace):
    spec = get_spec("brain_tumor")
    _tree(tmp_path / "bt" / "Training", list(spec.classes), per_class=6)
    _tree(tmp_path / "bt" / "Testing", list(spec.classes), per_class=2)
    bad = tmp_path / "masks" / "Testing" / "glioma" / "img_0.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a png")
    cfg = DataConfig(
        datasets=["brain_tumor"],
        roots={"brain_tumor": str(tmp_path / "bt")},
        masks_roots={"brain_tumor": str(tmp_path / "masks")},
        image_size=20,
    )
    with pytest.raises(DataError, match="lesion mask .*img_0.png"):
        prepare_dataset(cfg, "brain_tumor", workspace)


def _eye_with_bad_files(root: Path) -> None:
    """A real eye_disease layout with three unreadable files among good ones."""
    _tree(root, list(get_spec("eye_disease").classes), per_class=5, mode="RGB")
    (root / "glaucoma" / "broken.jpg").write_bytes(b"")
    (root / "normal" / "notes.png").write_text("not an image\n")
    good = (root / "cataract" / "img_0.png").read_bytes()
    (root / "cataract" / "cut.png").write_bytes(good[: len(good) // 2])


def test_unreadable_files_are_all_listed(tmp_path, workspace):
    spec = get_spec("eye_disease")
    _eye_with_bad_files(tmp_path / "eye")
    with pytest.raises(DataError) as err:
        build_manifest(
            spec, tmp_path / "eye", None, DataConfig(datasets=["eye_disease"]), workspace
        )
    message = str(err.value)
    assert "3 unreadable image file(s)" in message
    assert "  glaucoma/broken.jpg: empty file" in message
    assert "  normal/notes.png: not an image" in message
    assert "  cataract/cut.png: truncated or corrupt PNG" in message
    assert message.endswith(
        "fix or remove them, or set data.skip_unreadable: true to leave them out"
    )
    assert not list(workspace.manifests.glob("*.json"))


def test_skip_unreadable_leaves_them_out_and_records_them(tmp_path, workspace, caplog):
    spec = get_spec("eye_disease")
    _eye_with_bad_files(tmp_path / "eye")
    cfg = DataConfig(
        datasets=["eye_disease"],
        roots={"eye_disease": str(tmp_path / "eye")},
        image_size=16,
        skip_unreadable=True,
    )
    with caplog.at_level("WARNING", logger="kdray"):
        data = prepare_dataset(cfg, "eye_disease", workspace)
    assert "leaving out 3 unreadable image file(s)" in caplog.text
    manifest = data.manifest
    assert sum(manifest.counts().values()) == 20
    assert {e["path"] for e in manifest.entries}.isdisjoint(
        {"glaucoma/broken.jpg", "normal/notes.png", "cataract/cut.png"}
    )
    assert [s["path"] for s in manifest.skipped] == [
        "cataract/cut.png",
        "glaucoma/broken.jpg",
        "normal/notes.png",
    ]
    assert all(s["reason"] for s in manifest.skipped)
    assert sum(len(s) for s in data.splits.values()) == 20
    again = build_manifest(spec, tmp_path / "eye", None, cfg, workspace)  # reused as is
    assert again.skipped == manifest.skipped and again.entries == manifest.entries
    with pytest.raises(DataError, match=r"3 unreadable(.|\n)*  glaucoma/broken.jpg: empty file"):
        build_manifest(
            spec,
            tmp_path / "eye",
            None,
            cfg.model_copy(update={"skip_unreadable": False}),
            workspace,
        )


def test_skip_unreadable_still_needs_every_class(tmp_path, workspace):
    spec = get_spec("eye_disease")
    _tree(tmp_path / "eye", list(spec.classes), per_class=2)
    for f in (tmp_path / "eye" / "normal").iterdir():
        f.write_bytes(b"")
    cfg = DataConfig(datasets=["eye_disease"], skip_unreadable=True)
    with pytest.raises(DataError, match=r"no readable images left for class\(es\) \['normal'\]"):
        build_manifest(spec, tmp_path / "eye", None, cfg, workspace)


def test_older_manifest_without_skipped_still_loads(tmp_path, workspace):
    import json

    spec = get_spec("eye_disease")
    _tree(tmp_path / "eye", list(spec.classes), per_class=3)
    cfg = DataConfig(datasets=["eye_disease"])
    manifest = build_manifest(spec, tmp_path / "eye", None, cfg, workspace)
    (path,) = workspace.manifests.glob("eye_disease-*.json")
    stored = json.loads(path.read_text())
    del stored["skipped"]
    path.write_text(json.dumps(stored))
    assert build_manifest(spec, tmp_path / "eye", None, cfg, workspace).entries == manifest.entries
