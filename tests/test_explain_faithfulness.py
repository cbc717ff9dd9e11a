"""Faithfulness scores, on toy maps and on a student trained here, and the report builder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from kdray.config import ExplainConfig
from kdray.data.prepare import Manifest, PreparedData, Split
from kdray.data.specs import get_spec
from kdray.data.synthetic import make_arrays
from kdray.engine import make_loader, train_epoch
from kdray.explain import (
    build_report,
    deletion_insertion,
    energy_in_mask,
    grad_cam,
    pointing_game,
    random_maps,
)
from kdray.explain.faithfulness import nanmean
from kdray.explain.hooks import count_hooks
from kdray.models import StudentCNN

DATASET = "eye_disease"
SIZE = 48


def test_localisation_scores_on_toy_maps() -> None:
    masks = np.zeros((3, 8, 8), bool)
    masks[0, :4, :4] = True
    masks[1, 4:, 4:] = True  # third image: healthy, empty mask
    maps = np.zeros((3, 8, 8), np.float32)
    maps[0, 1, 1] = 1.0  # peak inside
    maps[1, 0, 0] = 1.0  # peak outside
    maps[1, 6, 6] = 0.5
    pg = pointing_game(maps, masks)
    assert pg[0] == 1.0 and pg[1] == 0.0 and np.isnan(pg[2])
    eim = energy_in_mask(maps, masks)
    assert eim[0] == pytest.approx(1.0) and eim[1] == pytest.approx(0.5 / 1.5)
    assert np.isnan(eim[2])
    uniform = energy_in_mask(np.ones((1, 8, 8)), masks[:1])
    assert uniform[0] == pytest.approx(0.25)
    assert nanmean(pg) == pytest.approx(0.5)
    flat_top = np.zeros((1, 8, 8), np.float32)
    flat_top[0, :4, :] = 1.0  # the maximum is shared by 32 pixels, 16 of them in the mask
    assert pointing_game(flat_top, masks[:1])[0] == pytest.approx(0.5)
    # A blank map (all zero, as a Grad-CAM whose weighted sum is negative) is a miss, not a tie
    # over the whole image; a constant one too. Healthy images stay unscored.
    blank = np.zeros((3, 8, 8), np.float32)
    assert pointing_game(blank, masks)[:2].tolist() == [0.0, 0.0]
    assert energy_in_mask(blank, masks)[:2].tolist() == [0.0, 0.0]
    assert np.isnan(pointing_game(blank, masks)[2]) and np.isnan(energy_in_mask(blank, masks)[2])
    assert pointing_game(np.full((1, 8, 8), 0.7), masks[:1])[0] == 0.0
    with pytest.raises(ValueError):
        pointing_game(maps, masks[:2])
    rnd = random_maps(4, (16, 16), seed=3)
    assert rnd.shape == (4, 16, 16) and rnd.min() >= 0.0 and rnd.max() <= 1.0
    np.testing.assert_array_equal(rnd, random_maps(4, (16, 16), seed=3))


class _LooksTopLeft(nn.Module):
    """Class 0's logit is the brightness of the top-left quadrant: the evidence is known."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x[:, :, :8, :8].mean(dim=(1, 2, 3)) * 20.0
        return torch.stack([s, torch.full_like(s, 10.0)], 1)


def test_deletion_insertion_ranks_the_true_evidence_first() -> None:
    x = torch.full((2, 3, 16, 16), 0.1)
    x[:, :, :8, :8] = 1.0
    right = np.zeros((2, 16, 16), np.float32)
    right[:, :8, :8] = 1.0
    wrong = 1.0 - right
    model = _LooksTopLeft()
    good = deletion_insertion(model, x, right, np.zeros(2, np.int64), steps=8, baseline="mean")
    bad = deletion_insertion(model, x, wrong, np.zeros(2, np.int64), steps=8, baseline="mean")
    assert good.deletion_curves.shape == (2, 9) and good.fractions[-1] == 1.0
    assert (good.deletion < bad.deletion - 0.1).all()
    assert (good.insertion > bad.insertion + 0.1).all()
    # both curves start or end at the untouched image
    np.testing.assert_allclose(good.deletion_curves[:, 0], good.insertion_curves[:, -1], rtol=1e-5)


@pytest.fixture(scope="module")
def trained() -> tuple[StudentCNN, dict[str, np.ndarray]]:
    """A small student trained on synthetic fundus photos for a few seconds."""
    images, labels, masks = make_arrays(DATASET, 100, SIZE, seed=0)
    test_images, test_labels, test_masks = make_arrays(DATASET, 12, SIZE, seed=1)
    torch.manual_seed(0)
    model = StudentCNN(4, [16, 32, 64])
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    loader = make_loader((images.transpose(0, 3, 1, 2).copy(), labels), 32, shuffle=True)

    def loss_fn(logits, y, extras, x):
        return {"loss": F.cross_entropy(logits, y)}

    for _ in range(10):
        train_epoch(model, loader, loss_fn, optimizer)
    model.eval()
    data = {
        "train_images": images.transpose(0, 3, 1, 2).copy(),
        "train_labels": labels,
        "train_masks": masks,
        "images": test_images.transpose(0, 3, 1, 2).copy(),
        "labels": test_labels,
        "masks": test_masks,
    }
    return model, data


def test_gradcam_beats_random_maps(trained) -> None:
    model, data = trained
    x, masks = data["images"], data["masks"]
    cam = grad_cam(model, x)
    randoms = [random_maps(len(x), (SIZE, SIZE), seed=s) for s in range(5)]
    pg_cam = nanmean(pointing_game(cam.maps, masks))
    pg_random = np.mean([nanmean(pointing_game(r, masks)) for r in randoms])
    area = masks[masks.any(axis=(1, 2))].mean()  # a random peak's chance of a hit
    assert pg_cam >= pg_random + 0.2, (pg_cam, pg_random)
    assert pg_cam >= 2.5 * area, (pg_cam, area)
    assert nanmean(energy_in_mask(cam.maps, masks)) > 1.5 * area

    deletion_cam = deletion_insertion(model, x, cam.maps, cam.targets).deletion.mean()
    deletion_random = np.mean(
        [deletion_insertion(model, x, r, cam.targets).deletion.mean() for r in randoms[:2]]
    )
    assert deletion_cam < deletion_random - 0.05, (deletion_cam, deletion_random)
    assert count_hooks(model) == 0


def _fixture_data(d: dict[str, np.ndarray], test: Split) -> PreparedData:
    """The trained fixture's data, ``test`` as both its val and test split."""
    spec = get_spec(DATASET)
    manifest = Manifest(
        dataset=DATASET,
        root="",
        masks_root=None,
        class_names=list(spec.classes),
        fingerprint="test",
    )
    return PreparedData(
        spec,
        manifest,
        SIZE,
        {"train": Split(d["train_images"], d["train_labels"]), "val": test, "test": test},
    )


def test_report_writes_files_and_metrics(trained, tmp_path: Path) -> None:
    student, d = trained
    from torchvision.models import densenet121

    from kdray.models import ModelSpec, build_model

    torch.manual_seed(1)
    teacher = build_model(
        ModelSpec(kind="teacher", num_classes=4, image_size=SIZE)
    ).eval()  # DenseNet121
    spec = get_spec(DATASET)
    manifest = Manifest(
        dataset=DATASET,
        root="",
        masks_root=None,
        class_names=list(spec.classes),
        fingerprint="test",
    )
    splits = {
        "train": Split(d["train_images"], d["train_labels"], d["train_masks"]),
        "val": Split(d["images"][:4], d["labels"][:4], d["masks"][:4]),
        "test": Split(d["images"], d["labels"], d["masks"]),
    }
    data = PreparedData(spec, manifest, SIZE, splits)
    cfg = ExplainConfig(
        report_images=8, timing_images=2, grid_examples=3, shap_background=4, shap_nsamples=8
    )
    uniform = np.full((len(d["labels"]), 4), 0.25)  # a baseline that always says "no idea"
    curves = {"teacher": [0.5, 0.9, 0.8], "student": [0.6, 0.7], "baseline": []}
    report = build_report(
        data,
        teacher,
        student,
        cfg,
        tmp_path / "report",
        baseline_probabilities=uniform,
        learning_curves=curves,
        train_images=(len(d["train_labels"]), 7),
    )

    # Every section compares teacher and student: each says what each side trained on.
    sections = report.markdown.split("\n## ")[1:]
    assert len(sections) >= 8
    seen = f"_Trained on: teacher {len(d['train_labels'])} images, students (KD and CE-only) 7"
    assert all(seen in section for section in sections)
    assert "## Sanity checks" in report.markdown and report.paths["sanity"].is_file()
    for model in ("teacher", "student"):
        for method in ("feature_maps", "gradcam", "shap"):
            assert -1.0 <= report.metrics[f"{model}.randomisation.{method}"] <= 1.0
        assert report.metrics[f"{model}.blank.gradcam"] >= 0

    for key in (
        "markdown",
        "json",
        "grid",
        "feature_maps",
        "curves",
        "reliability",
        "learning_curves",
    ):
        assert report.paths[key].is_file(), key
    assert "| teacher | 3 | 0.900 (2) | 0.800 |" in report.markdown
    assert "| KD student | 2 | 0.700 (2) | 0.700 |" in report.markdown
    assert "| CE-only baseline | 0 |" not in report.markdown  # no curve, no row
    assert Image.open(report.paths["grid"]).size[0] > 600
    assert report.markdown == report.paths["markdown"].read_text()
    assert "| Parameters |" in report.markdown and "Pointing game" in report.markdown
    m = report.metrics
    for model in ("teacher", "student"):
        for method in ("feature_maps", "gradcam", "shap"):
            assert m[f"{model}.met_ms.{method}"] > 0
            assert 0.0 <= m[f"{model}.deletion_auc.{method}"] <= 1.0
            assert 0.0 <= m[f"{model}.pointing_game.{method}"] <= 1.0
        assert 0.0 <= m[f"{model}.pointing_game.random"] <= 1.0
        assert m[f"{model}.flops_224"] > m[f"{model}.flops"] > 0
    # Parameter counts against independent numbers: torchvision's own DenseNet121, by hand.
    assert m["teacher.params"] == sum(p.numel() for p in densenet121(num_classes=4).parameters())
    assert m["student.params"] == sum(p.numel() for p in student.parameters())
    assert m["ratio.params"] > 50
    # Behaviour on the synthetic lesions (the student is trained, the teacher is not): the
    # student's SHAP deletes its evidence faster than a random map, and its maps point at the
    # lesion more often than a random map does.
    assert m["student.deletion_auc.shap"] < m["student.deletion_auc.random"], m
    assert m["student.pointing_game.gradcam"] > m["student.pointing_game.random"], m
    assert m["student.energy_in_mask.shap"] > m["student.energy_in_mask.random"], m
    assert all(np.isfinite(v) for v in m.values())
    accuracy = float((d["labels"] == 0).mean())  # the uniform baseline's argmax is class 0
    assert m["baseline.ece"] == pytest.approx(abs(accuracy - 0.25))
    assert (
        "| CE-only baseline |" in report.markdown
        and "![Reliability diagram](reliability.png)" in report.markdown
    )
    assert json.loads(report.paths["json"].read_text())["metrics"] == m
    assert "## Teacher–student agreement" in report.markdown
    for method in ("gradcam", "shap"):
        assert {
            f"agreement.rank_correlation.{method}",
            f"agreement.top10_overlap_random.{method}",
        } <= set(m)
    # Feature maps are scored at Grad-CAM's block (DenseNet121's last block is 1x1 at this size
    # and would be a constant map, with no ranking to compare).
    assert np.isfinite(m["agreement.rank_correlation.feature_maps"])
    assert "The scored feature maps" in report.markdown
    # Grad-CAM, the feature maps and a random map are scored on every masked test image too.
    n_masked = int(d["masks"].any(axis=(1, 2)).sum())
    assert m["localisation_test.images"] == n_masked > 8
    for model in ("teacher", "student"):
        for method in ("feature_maps", "gradcam"):
            assert 0.0 <= m[f"{model}.localisation_test.{method}"] <= 1.0
    assert m["student.localisation_test.gradcam"] > m["localisation_test.random"], m
    assert f"every test image with a lesion mask ({n_masked})" in report.markdown


def test_the_whole_split_pointing_game_equals_the_reports_when_it_scores_every_image(
    trained, tmp_path
) -> None:
    """Scored in batches over the masked test images, Grad-CAM and the feature maps give the same
    pointing game as the report's own scoring when the report scores the whole test split."""
    student, d = trained
    test = Split(d["images"], d["labels"], d["masks"])
    data = _fixture_data(d, test)
    cfg = ExplainConfig(
        methods=["feature_maps", "gradcam"],
        report_images=len(test),
        timing_images=1,
        grid_examples=1,
        shap_background=4,
    )
    m = build_report(data, student, student, cfg, tmp_path / "all").metrics
    for method in ("feature_maps", "gradcam"):
        assert m[f"student.localisation_test.{method}"] == pytest.approx(
            m[f"student.pointing_game.{method}"]
        )
    # Without masks there is nothing to score.
    data = _fixture_data(d, Split(d["images"], d["labels"], None))
    m = build_report(
        data, student, student, cfg.model_copy(update={"report_images": 4}), tmp_path / "none"
    ).metrics
    assert not any(k.startswith("localisation_test") or ".localisation_test." in k for k in m)


def test_the_report_scores_the_feature_map_of_gradcams_block(trained) -> None:
    from kdray.explain.gradcam import default_cam_layer, layer_output_size, resolve_cam
    from kdray.explain.inputs import to_batch
    from kdray.explain.layer_maps import feature_maps
    from kdray.explain.report import _score_maps

    student, d = trained
    x = to_batch(d["images"][:4])
    background = d["train_images"][:4]
    cfg = ExplainConfig(methods=["feature_maps"])
    layer = default_cam_layer(student, SIZE)
    assert layer != student.block_names[-1] and min(layer_output_size(student, layer, SIZE)) >= 7
    cam = resolve_cam("student", student, cfg, SIZE)  # no measured choice: the default layer
    assert cam.layer == layer and cam.method == cfg.cam_method
    scored = _score_maps(student, cam, x, background, cfg, seed=0)
    expected = feature_maps(student, x, [layer]).maps[:, 0]
    np.testing.assert_allclose(scored.maps["feature_maps"], expected, atol=1e-6)
    # A measured choice is taken; a layer the config names wins over it.
    assert resolve_cam("student", student, cfg, SIZE, ("layercam", "features.block2")) == (
        "layercam",
        "features.block2",
    )
    named = cfg.model_copy(update={"student_layer": student.block_names[0]})
    cam = resolve_cam("student", student, named, SIZE, ("layercam", "features.block2"))
    assert cam == (named.cam_method, student.block_names[0])
    scored = _score_maps(student, cam, x, background, named, seed=0)
    expected = feature_maps(student, x, [student.block_names[0]]).maps[:, 0]
    np.testing.assert_allclose(scored.maps["feature_maps"], expected, atol=1e-6)


def test_a_student_agrees_with_itself_and_not_with_a_random_map(trained, tmp_path: Path) -> None:
    """Agreement in the report: a model explained beside itself agrees fully; beside an untrained
    copy of its architecture less; a random map hardly."""
    student, d = trained
    test = Split(d["images"], d["labels"], d["masks"])
    data = _fixture_data(d, test)
    cfg = ExplainConfig(
        methods=["gradcam", "shap"],
        report_images=8,
        timing_images=1,
        grid_examples=1,
        shap_background=4,
        shap_nsamples=8,
    )
    same = build_report(data, student, student, cfg, tmp_path / "same").metrics
    assert same["agreement.predictions"] == same["agreement.predictions_test"] == 1.0
    for method in ("gradcam", "shap"):
        assert same[f"agreement.rank_correlation.{method}"] == pytest.approx(1.0)
        assert same[f"agreement.top10_overlap.{method}"] == pytest.approx(1.0)
        assert same[f"agreement.rank_correlation_random.{method}"] < 0.5, same
        assert same[f"agreement.top10_overlap_random.{method}"] < 0.5, same
    torch.manual_seed(3)
    untrained = StudentCNN(4, [16, 32, 64]).eval()  # the trained student's architecture
    other = build_report(data, untrained, student, cfg, tmp_path / "other").metrics
    assert other["agreement.rank_correlation.gradcam"] < 0.9, other
    assert other["agreement.predictions_test"] < 1.0, other


def test_real_layout_with_masks_only_for_tumours_is_scored_on_those(tmp_path: Path) -> None:
    """Brain MRI in the Kaggle layout, masks for the tumour classes only (as real mask sets)."""
    import shutil

    from kdray.config import DataConfig
    from kdray.data.prepare import prepare_dataset
    from kdray.data.synthetic import generate
    from kdray.workspace import Workspace

    generate("brain_tumor", tmp_path / "bt", tmp_path / "masks", 6, 48, 0)
    healthy = [p for p in (tmp_path / "masks").rglob("*") if p.is_dir() and p.name == "notumor"]
    assert healthy
    for folder in healthy:
        shutil.rmtree(folder)
    cfg = DataConfig(
        datasets=["brain_tumor"],
        roots={"brain_tumor": str(tmp_path / "bt")},
        masks_roots={"brain_tumor": str(tmp_path / "masks")},
        image_size=32,
    )
    data = prepare_dataset(cfg, "brain_tumor", Workspace(tmp_path / "ws").create())
    test = data.splits["test"]
    notumor = data.spec.classes.index("notumor")
    assert test.masks is not None and (test.labels == notumor).any()
    torch.manual_seed(0)
    teacher, student = StudentCNN(4, [8, 16, 16, 16]).eval(), StudentCNN(4, [4, 8, 8, 8]).eval()
    explain_cfg = ExplainConfig(
        report_images=len(test),
        timing_images=1,
        grid_examples=2,
        shap_background=4,
        shap_nsamples=4,
    )
    report = build_report(data, teacher, student, explain_cfg, tmp_path / "report")
    n_masked = int((test.labels != notumor).sum())
    assert 0 < n_masked < len(test)
    assert f"{len(test)} test images scored ({n_masked} with a lesion mask)" in report.markdown
    assert "No lesion masks" not in report.markdown
    for model in ("teacher", "student"):
        for method in ("feature_maps", "gradcam", "shap", "random"):
            assert np.isfinite(report.metrics[f"{model}.pointing_game.{method}"]), (model, method)


@pytest.mark.parametrize("source", ["synthetic", "folder"])
def test_the_report_and_its_figures_name_the_data_the_models_saw(source, tmp_path, monkeypatch):
    """Data laid out as `prepare` lays it out: the stand-in's own folder in the workspace, or a
    real copy. The first line says which (the stand-in with its generator's parameters, a real
    folder by its name, never its path); no figure title calls the stand-in by the public
    dataset's catalogue title."""
    from kdray.config import DataConfig
    from kdray.data.prepare import prepare_dataset
    from kdray.data.synthetic import generate
    from kdray.explain import report as report_module
    from kdray.workspace import Workspace

    titles: list[str] = []
    for name in ("explanation_grid", "curves_figure", "feature_map_figure", "reliability_figure"):
        real = getattr(report_module, name)

        def spy(*args, real=real, **kwargs):
            titles.append(next(a for a in reversed(args) if isinstance(a, str)))
            return real(*args, **kwargs)

        monkeypatch.setattr(report_module, name, spy)
    if source == "folder":
        generate("eye_disease", tmp_path / "odir-fundus", tmp_path / "masks", 6, 32, 0)
        cfg = DataConfig(image_size=32, roots={"eye_disease": str(tmp_path / "odir-fundus")})
        first = "# Transparency report: Eye Diseases Classification (`eye_disease`), folder `odir-fundus`"
        label = "odir-fundus"
    else:
        cfg = DataConfig(image_size=32, synthetic={"n_per_class": 6, "size": 32, "seed": 2})
        first = (
            "# Transparency report: Eye Diseases Classification (`eye_disease`), synthetic "
            "stand-in (6 images per class generated at 32 px, seed 2)"
        )
        label = "synthetic stand-in"
    data = prepare_dataset(cfg, "eye_disease", Workspace(tmp_path / "ws").create())
    torch.manual_seed(0)
    teacher, student = StudentCNN(4, [4, 8, 8]).eval(), StudentCNN(4, [4, 8, 8]).eval()
    explain_cfg = ExplainConfig(
        methods=["feature_maps", "gradcam"],
        report_images=4,
        timing_images=1,
        grid_examples=1,
        sanity=False,
    )
    report = build_report(data, teacher, student, explain_cfg, tmp_path / "report")
    assert report.markdown.splitlines()[0] == first
    assert str(tmp_path) not in report.markdown
    assert len(titles) == 4 and all("Kaggle" not in t for t in titles), titles
    assert f"Eye Diseases Classification · {label} (eye_disease)" in titles[0]
