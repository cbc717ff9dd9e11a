"""KD student training: the cached-logit path never runs the teacher; the live path does."""

from __future__ import annotations

import numpy as np
import pytest

from kdray.config import ExperimentConfig
from kdray.engine import predict_logits
from kdray.models import (
    ModelSpec,
    TeacherDenseNet,
    build_model,
    load_model,
    model_files,
    save_model,
)
from kdray.trial import StudentJob, train_student

from conftest import tiny_data


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    data = tiny_data(n_per_class=6, size=32)
    spec = ModelSpec(
        kind="teacher", num_classes=4, image_size=32, class_names=list(data.spec.classes)
    )
    teacher = build_model(spec).eval()
    directory = tmp_path_factory.mktemp("teacher") / "model"
    save_model(teacher, spec, directory)
    cfg = ExperimentConfig.model_validate({"student": {"epochs": 2, "batch_size": 8}})
    return data, cfg, directory, predict_logits(teacher, data.splits["train"].images)


def _job(setup, **kw):
    data, cfg, _, _ = setup
    return StudentJob(
        cfg,
        "eye_disease",
        list(data.spec.classes),
        32,
        data.splits["train"],
        data.splits["val"],
        **kw,
    )


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
    out = train_student(
        _job(setup, teacher_logits=setup[3]),
        0.5,
        4.0,
        [4, 8, 8, 16, 16],
        report=lambda m, d: reports.append((m, sorted(p.name for p in d.iterdir()))),
    )
    assert calls == []
    assert [m["epoch"] for m, _ in reports] == [0, 1]
    assert reports[-1][1] == ["model.json", "model.safetensors", "train_state.pt"]
    assert out["train_soft"] > 0  # the soft term was active


def test_live_trial_runs_the_teacher_on_every_batch(setup, monkeypatch):
    calls = _count_teacher_calls(monkeypatch)
    train_student(_job(setup, teacher_files=model_files(setup[2])), 0.5, 4.0, [4, 8, 8, 16, 16])
    n_train = len(setup[0].splits["train"])
    assert sum(calls) == 2 * n_train  # two epochs, every training image once each


def test_a_live_trial_needs_no_path_on_the_drivers_disk(setup, tmp_path, monkeypatch):
    """The teacher travels as bytes with the job: a node without the driver's disk can run it."""
    import shutil

    copy = tmp_path / "teacher"
    shutil.copytree(setup[2], copy)
    job = _job(setup, teacher_files=model_files(copy))
    shutil.rmtree(copy)
    calls = _count_teacher_calls(monkeypatch)
    train_student(job, 0.5, 4.0, [4, 8, 8, 16, 16])
    assert sum(calls) == 2 * len(setup[0].splits["train"])


def test_cache_and_live_give_the_same_soft_targets(setup):
    """Students see un-augmented images, so the cache is exactly what the live teacher gives."""
    a = train_student(_job(setup, teacher_logits=setup[3]), 0.3, 2.0, [4, 8, 8, 16, 16])
    b = train_student(_job(setup, teacher_files=model_files(setup[2])), 0.3, 2.0, [4, 8, 8, 16, 16])
    assert a["train_soft"] == pytest.approx(b["train_soft"], rel=1e-4)
    assert a["val_accuracy"] == b["val_accuracy"]


def test_students_on_a_share_of_the_training_split_get_the_teachers_logits_of_those_rows(setup):
    """``data.synthetic.student_fraction``: the job's images and cached logits are cut by the same
    rows, so the cache still gives exactly what the live teacher gives on the students' images."""
    from kdray.sweep import make_job
    from kdray.teacher import LOGITS_FILE, TeacherResult

    data, cfg, directory, logits = setup
    np.save(directory.parent / LOGITS_FILE, logits)
    teacher = TeacherResult(directory.parent, "run", {}, 0, 0, reused=True)
    cfg = ExperimentConfig.model_validate(
        {**cfg.to_dict(), "data": {"synthetic": {"student_fraction": 0.5}}}
    )
    cached = make_job(cfg, data, teacher, None, None)
    rows = data.student_indices(0.5, cfg.data.split_seed)
    assert len(cached.train) == len(rows) == len(data.splits["train"]) // 2
    assert np.array_equal(cached.train.images, data.splits["train"].images[rows])
    assert np.array_equal(cached.teacher_logits, logits[rows])
    live_cfg = cfg.model_copy(update={"kd": cfg.kd.model_copy(update={"teacher_logits": "live"})})
    live = make_job(live_cfg, data, teacher, None, None)
    a = train_student(cached, 0.3, 2.0, [4, 8, 8, 16, 16])
    b = train_student(live, 0.3, 2.0, [4, 8, 8, 16, 16])
    assert a["train_soft"] == pytest.approx(b["train_soft"], rel=1e-4)


def test_ce_only_needs_no_teacher(setup):
    out = train_student(_job(setup), 1.0, 4.0, [4, 8, 8, 16, 16])
    assert out["train_soft"] == 0.0
    with pytest.raises(ValueError, match="teacher_logits or teacher_files"):
        train_student(_job(setup), 0.5, 4.0, [4, 8, 8, 16, 16])


def test_best_epoch_weights_are_reported(setup, tmp_path):
    saved = {}

    def report(metrics, directory):
        model, _ = load_model(directory)
        saved[metrics["epoch"]] = (
            metrics["best_epoch"],
            predict_logits(model, setup[0].splits["val"].images),
        )

    train_student(_job(setup, teacher_logits=setup[3]), 0.5, 4.0, [4, 8, 8, 16, 16], report=report)
    best_epoch_at_end, logits_at_end = saved[1]
    # The last report holds the weights of the best epoch, as that epoch's own report did.
    assert np.array_equal(saved[best_epoch_at_end][1], logits_at_end)


def _outcome(acc, flops, run="r"):
    from kdray.trial import TrialOutcome

    return TrialOutcome(run, {}, [8], 1e-3, acc, 10, flops, None)


def test_champion_rule_takes_fewest_flops_within_tolerance():
    from kdray.champion import select_champion

    trials = [_outcome(0.90, 500, "big"), _outcome(0.895, 100, "small"), _outcome(0.85, 10, "tiny")]
    assert select_champion(trials, tolerance=0.01).run_id == "small"
    assert select_champion(trials, tolerance=0.0).run_id == "big"
    assert select_champion(trials, tolerance=0.1).run_id == "tiny"
    with pytest.raises(RuntimeError):
        select_champion([], 0.01)


def test_search_space_first_point_is_the_configured_student():
    from kdray.sweep import search_space
    from kdray.trial import trial_hyperparameters

    cfg = ExperimentConfig.model_validate(
        {"kd": {"alpha": 0.3, "temperature": 6.0}, "student": {"base_width": 12, "lr": 0.002}}
    )
    space, first = search_space(cfg)
    assert {"alpha", "temperature", "lr", "base_width", "growth", "depth"} == set(space)
    assert first == {
        "alpha": 0.3,
        "temperature": 6.0,
        "lr": 0.002,
        "base_width": 12,
        "growth": 2.0,
        "depth": 5,
    }
    assert 12 in space["base_width"].categories
    assert trial_hyperparameters(first, cfg) == ([12, 24, 48, 96, 96], 0.002)
    explicit = ExperimentConfig.model_validate({"student": {"depth": 2, "widths": [4, 6]}})
    space, first = search_space(explicit)
    assert set(space) == {"alpha", "temperature", "lr"}
    assert trial_hyperparameters(first, explicit)[0] == [4, 6]


def test_resume_from_a_checkpoint_continues_exactly(setup, tmp_path):
    """A trial restarted from its epoch-1 checkpoint ends where an uninterrupted one does."""
    import shutil

    job = _job(setup, teacher_logits=setup[3])
    saved = {}

    def keep(metrics, directory):
        shutil.copytree(directory, tmp_path / f"epoch{metrics['epoch']}")
        saved[metrics["epoch"]] = metrics

    full = train_student(job, 0.5, 4.0, [4, 8, 8, 16, 16], report=keep)
    resumed_reports = []
    resumed = train_student(
        job,
        0.5,
        4.0,
        [4, 8, 8, 16, 16],
        resume_from=tmp_path / "epoch0",
        report=lambda m, d: resumed_reports.append(m["epoch"]),
    )
    assert resumed_reports == [1]  # only the epoch after the checkpoint ran
    for key in ("train_loss", "val_loss", "val_accuracy", "best_val_accuracy"):
        assert resumed[key] == pytest.approx(full[key], rel=1e-5), key


def test_each_dataset_gets_its_own_reproducible_search():
    """One seed for all datasets made the three sweeps try the same points in the same order."""
    from kdray.sweep import METRIC, _search_alg, sampler_seed, search_space

    cfg = ExperimentConfig.model_validate({"tune": {"search": "optuna"}})
    space, first = search_space(cfg)

    def points(dataset: str) -> list[dict]:
        searcher = _search_alg(cfg, first, dataset)
        searcher.set_search_properties(METRIC, "max", space)
        return [searcher.suggest(f"t{i}") for i in range(4)]

    brain, eye = points("brain_tumor"), points("eye_disease")
    assert brain[0] == eye[0] == first  # the configured student comes first everywhere
    assert brain[1:] != eye[1:]  # then each dataset searches on its own
    assert points("brain_tumor") == brain  # and the same again next time
    assert (
        sampler_seed(0, "brain_tumor")
        == sampler_seed(0, "brain_tumor")
        != sampler_seed(1, "brain_tumor")
    )


def test_the_search_never_proposes_a_student_deeper_than_the_image_allows():
    from kdray.sweep import search_space

    cfg = ExperimentConfig.model_validate(
        {"data": {"image_size": 32}, "tune": {"depth": [4, 5, 6]}}
    )
    space, _ = search_space(cfg)
    assert sorted(space["depth"].categories) == [4, 5]  # 6 blocks would pool 32 px to nothing
    wide, _ = search_space(ExperimentConfig.model_validate({"tune": {"depth": [4, 5, 6]}}))  # 64 px
    assert sorted(wide["depth"].categories) == [4, 5, 6]
    with pytest.raises(
        ValueError, match="student.depth: 6 blocks is too deep for data.image_size 32"
    ):
        ExperimentConfig.model_validate({"data": {"image_size": 32}, "student": {"depth": 6}})


def test_the_baseline_searches_lr_only_with_the_champions_widths():
    """The CE baseline's search: the KD sweep's budget over lr; alpha 1 and widths fixed."""
    from ray.tune.search.variant_generator import parse_spec_vars

    from kdray.sweep import METRIC, _search_alg, baseline_search_space
    from kdray.trial import trial_hyperparameters

    cfg = ExperimentConfig.model_validate({"tune": {"search": "optuna", "lr": [0.001, 0.01]}})
    space, first = baseline_search_space(cfg, [8, 16, 32], temperature=3.0, lr=0.02)
    assert first == {"lr": 0.01}  # the champion's lr, clipped to the searched range
    constants, domains, _ = parse_spec_vars(space)
    assert [path for path, _ in domains] == [("lr",)]
    searcher = _search_alg(cfg, first, "brain_tumor")
    searcher.set_search_properties(METRIC, "max", space)
    fixed = {path[0]: value for path, value in constants}
    points = [{**fixed, **searcher.suggest(f"t{i}")} for i in range(5)]  # as Tune merges them
    assert points[0]["lr"] == 0.01
    assert len({p["lr"] for p in points}) == 5 and all(0.001 <= p["lr"] <= 0.01 for p in points)
    for point in points:
        assert point["alpha"] == 1.0
        assert trial_hyperparameters(point, cfg) == ([8, 16, 32], point["lr"])


def test_the_selected_trial_is_its_seeds_run_only_when_it_trained_every_epoch():
    from kdray.champion import _is_seed_run
    from kdray.trial import TrialOutcome

    cfg = ExperimentConfig.model_validate({"seed": 0, "student": {"epochs": 6}})
    full = TrialOutcome("r", {}, [4], 1e-3, 0.9, 1, 1, None, epochs_run=6)
    assert _is_seed_run(full, 0, cfg)  # trained with the config's seed, every epoch: no retrain
    assert not _is_seed_run(full, 1, cfg)
    stopped = TrialOutcome("r", {}, [4], 1e-3, 0.9, 1, 1, None, epochs_run=3)  # ASHA stopped it
    assert not _is_seed_run(stopped, 0, cfg)
    assert not _is_seed_run(TrialOutcome("r", {}, [4], 1e-3, 0.9, 1, 1, None), 0, cfg)  # unknown


def test_the_tuners_budget_sampler_and_scheduler_come_from_the_config(tmp_path):
    """Trial count, trials at once, actor reuse, TPE's random start and ASHA's rungs: all keys;
    two objectives (the default champion rule) or one (tune.champion: accuracy)."""
    from ray.tune.schedulers import ASHAScheduler

    from kdray.pareto import ParetoASHA
    from kdray.sweep import (
        METRIC,
        SweepProgress,
        _new_tuner,
        search_space,
    )
    from kdray.trial import TRANSPARENCY, score_epochs
    from kdray.workspace import Workspace

    cfg = ExperimentConfig.model_validate(
        {
            "student": {"epochs": 10},
            "tune": {
                "num_samples": 17,
                "max_concurrent_trials": 3,
                "reuse_actors": False,
                "startup_trials": 5,
                "grace_period": 4,
                "reduction_factor": 3,
            },
        }
    )
    space, first = search_space(cfg)
    progress = SweepProgress("brain_tumor", "KD sweep", 17, 10)
    tuner = _new_tuner(cfg, "x", space, first, Workspace(tmp_path), "s", "brain_tumor", progress)
    tc = tuner._local_tuner._tune_config
    assert (tc.num_samples, tc.max_concurrent_trials, tc.reuse_actors) == (17, 3, False)
    assert tc.search_alg._sampler._n_startup_trials == 5
    # Two objectives: TPE over both, rungs judged on Pareto fronts; the best model is scored at
    # the rung (epoch 4, index 3) and at the last epoch.
    assert tc.search_alg.metric == [METRIC, TRANSPARENCY] and tc.search_alg.mode == ["max", "max"]
    assert isinstance(tc.scheduler, ParetoASHA) and tc.scheduler.metrics == [METRIC, TRANSPARENCY]
    assert tc.scheduler.reduction_factor == 3 and tc.scheduler.max_t == 10
    assert tc.scheduler.milestones() == [4]  # grace 4; 12 > max_t
    assert score_epochs(cfg) == {3, 9}
    one = cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"champion": "accuracy"})})
    tuner = _new_tuner(one, "x", space, first, Workspace(tmp_path), "s", "brain_tumor", progress)
    tc = tuner._local_tuner._tune_config
    assert tc.search_alg.metric == METRIC and isinstance(tc.scheduler, ASHAScheduler)
    assert tc.scheduler._reduction_factor == 3 and tc.scheduler._max_t == 10
    assert [t for t, _ in tc.scheduler._brackets[0]._rungs] == [4]
    assert score_epochs(one) == {9}  # scored once, reported, not searched on
    defaults = ExperimentConfig().tune
    assert defaults.num_samples >= 24 and defaults.reuse_actors  # the default searches
    assert defaults.champion == "transparent"


def test_settling_a_restored_sweep_deletes_only_the_runs_of_trials_tune_never_saved(tmp_path):
    """A driver killed just after a trial began, before Tune saved its experiment state, leaves
    that trial's MLflow run RUNNING and the restored search unaware of it: once the search ends,
    that run alone is closed (KILLED, tagged) and deleted; the trials Tune knows keep theirs."""
    from types import SimpleNamespace

    from kdray.config import MLflowConfig
    from kdray.sweep import _settle_trial_runs
    from kdray.tracking import TAG_TRIAL, Tracker
    from kdray.workspace import Workspace

    ws = Workspace(tmp_path / "ws").create()
    tracker = Tracker.open(MLflowConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), ws)
    parent = tracker.start_run("p", "eye_disease", "parent")
    other_parent = tracker.start_run("q", "eye_disease", "parent")
    runs = {
        tid: tracker.start_run(f"trial-{tid}", "eye_disease", "trial", parent, {TAG_TRIAL: tid})
        for tid in ("aaaa0001", "aaaa0002", "aaaa0003", "lost0004")
    }
    elsewhere = tracker.start_run(
        "x", "eye_disease", "trial", other_parent, {TAG_TRIAL: "lost0005"}
    )
    baseline = tracker.start_run(
        "b", "eye_disease", "baseline-trial", parent, {TAG_TRIAL: "lost0006"}
    )

    def result(tid: str, n: int, metrics: dict, error=None):
        path = f"/r/sweep/kd_trial_eye_disease_{tid}_{n}_alpha=0.5,temperature=4"
        return SimpleNamespace(path=path, metrics=metrics, error=error)

    grid = [
        result("aaaa0001", 1, {"mlflow_run_id": runs["aaaa0001"], "epoch": 3}),  # all 4 epochs
        result("aaaa0002", 2, {"mlflow_run_id": runs["aaaa0002"], "epoch": 1}),  # stopped early
        result("aaaa0003", 3, {}, error=RuntimeError("died before its first report")),
    ]
    _settle_trial_runs(tracker, grid, 4, parent, "trial", "kd_trial_eye_disease")

    def info(run_id: str):
        return tracker.client.get_run(run_id).info

    assert info(runs["aaaa0001"]).status == "FINISHED"
    assert info(runs["aaaa0002"]).status == "FINISHED"
    assert tracker.client.get_run(runs["aaaa0002"]).data.tags["kdray.stopped_early"] == "true"
    assert info(runs["aaaa0003"]).status == "RUNNING"  # Tune knows it: not this rule's to close
    lost = tracker.client.get_run(runs["lost0004"])
    assert (lost.info.status, lost.info.lifecycle_stage) == ("KILLED", "deleted")
    assert "kdray.lost" in lost.data.tags
    # Another sweep's runs and the other role's are left alone.
    assert (info(elsewhere).status, info(elsewhere).lifecycle_stage) == ("RUNNING", "active")
    assert (info(baseline).status, info(baseline).lifecycle_stage) == ("RUNNING", "active")
    assert tracker.child_runs(parent, "trial") == [
        runs[t] for t in ("aaaa0001", "aaaa0002", "aaaa0003")
    ]
