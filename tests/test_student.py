"""KD student training: the cached-logit path never runs the teacher; the live path does."""

from __future__ import annotations

import numpy as np
import pytest

from kdray.config import ExperimentConfig
from kdray.engine import predict_logits
from kdray.models import ModelSpec, TeacherDenseNet, build_model, load_model, save_model
from kdray.sweep import StudentJob, select_best, train_student

from conftest import tiny_data


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    data = tiny_data(n_per_class=6, size=32)
    spec = ModelSpec(kind="teacher", num_classes=4, image_size=32, class_names=list(data.spec.classes))
    teacher = build_model(spec).eval()
    directory = tmp_path_factory.mktemp("teacher") / "model"
    save_model(teacher, spec, directory)
    cfg = ExperimentConfig.model_validate({"student": {"epochs": 2, "batch_size": 8}})
    return data, cfg, directory, predict_logits(teacher, data.splits["train"].images)


def _job(setup, **kw):
    data, cfg, _, _ = setup
    return StudentJob(cfg, "eye_disease", list(data.spec.classes), 32, data.splits["train"],
                      data.splits["val"], **kw)


def _count_teacher_calls(monkeypatch):
    calls = []
    original = TeacherDenseNet.forward

    def spy(self, x):
        calls.append(x.shape[0])
        return original(self, x)

    monkeypatch.setattr(TeacherDenseNet, "forward", spy)
    return calls


def test_cached_trial_never_calls_the_teacher(setup, monkeypatch):
    calls = _count_teacher_calls(monkeypatch)
    reports = []
    out = train_student(_job(setup, teacher_logits=setup[3]), 0.5, 4.0, [4, 8, 8, 16, 16],
                        report=lambda m, d: reports.append((m, sorted(p.name for p in d.iterdir()))))
    assert calls == []
    assert [m["epoch"] for m, _ in reports] == [0, 1]
    assert reports[-1][1] == ["model.json", "model.safetensors"]
    assert out["train_soft"] > 0  # the soft term was active


def test_live_trial_runs_the_teacher_on_every_batch(setup, monkeypatch):
    calls = _count_teacher_calls(monkeypatch)
    train_student(_job(setup, teacher_dir=str(setup[2])), 0.5, 4.0, [4, 8, 8, 16, 16])
    n_train = len(setup[0].splits["train"])
    assert sum(calls) == 2 * n_train  # two epochs, every training image once each


def test_cache_and_live_give_the_same_soft_targets(setup):
    """Students see un-augmented images, so the cache is exactly what the live teacher gives."""
    a = train_student(_job(setup, teacher_logits=setup[3]), 0.3, 2.0, [4, 8, 8, 16, 16])
    b = train_student(_job(setup, teacher_dir=str(setup[2])), 0.3, 2.0, [4, 8, 8, 16, 16])
    assert a["train_soft"] == pytest.approx(b["train_soft"], rel=1e-4)
    assert a["val_accuracy"] == b["val_accuracy"]


def test_ce_only_needs_no_teacher(setup):
    out = train_student(_job(setup), 1.0, 4.0, [4, 8, 8, 16, 16])
    assert out["train_soft"] == 0.0
    with pytest.raises(ValueError, match="teacher_logits or teacher_dir"):
        train_student(_job(setup), 0.5, 4.0, [4, 8, 8, 16, 16])


def test_best_epoch_weights_are_reported(setup, tmp_path):
    saved = {}

    def report(metrics, directory):
        model, _ = load_model(directory)
        saved[metrics["epoch"]] = (metrics["best_epoch"], predict_logits(model, setup[0].splits["val"].images))

    train_student(_job(setup, teacher_logits=setup[3]), 0.5, 4.0, [4, 8, 8, 16, 16], report=report)
    best_epoch_at_end, logits_at_end = saved[1]
    # The last report holds the weights of the best epoch, as that epoch's own report did.
    assert np.array_equal(saved[best_epoch_at_end][1], logits_at_end)


def test_select_best_prefers_accuracy_then_fewer_params():
    cands = [{"best_val_accuracy": 0.8, "params": 100}, {"best_val_accuracy": 0.9, "params": 500},
             {"best_val_accuracy": 0.9, "params": 200}]
    assert select_best(cands)["params"] == 200
    with pytest.raises(RuntimeError):
        select_best([])
