"""Transparency as an objective: the score and the layer it picks, Pareto fronts, the scheduler
that promotes by them, and the champion rule."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kdray.champion import select_champion
from kdray.explain import scoring
from kdray.explain.scoring import ScoringSet, score_transparency
from kdray.pareto import ParetoASHA, dominates, front_ranks, pareto_front, rungs
from kdray.trial import TrialOutcome


def test_fronts_and_ranks():
    points = [(0.9, 0.2), (0.8, 0.5), (0.85, 0.4), (0.7, 0.1), (0.9, 0.2)]
    assert dominates((0.9, 0.3), (0.9, 0.2)) and not dominates((0.9, 0.2), (0.9, 0.2))
    assert pareto_front(points) == [0, 1, 2, 4]  # equal points do not dominate each other
    assert front_ranks(points) == [0, 0, 0, 1, 0]
    assert (
        rungs(4, 3, 12) == [4.0] and rungs(1, 2, 9) == [1.0, 2.0, 4.0, 8.0] and rungs(2, 3, 2) == []
    )


def _result(t, acc, transparency):
    return {"training_iteration": t, "best_val_accuracy": acc, "transparency": transparency}


def test_pareto_asha_stops_only_a_trial_enough_others_beat_on_both():
    s = ParetoASHA(["best_val_accuracy", "transparency"], max_t=12, grace_period=4)

    def act(name: str, t: int, acc: float, transparency: float) -> str:
        return s.on_trial_result(
            None, SimpleNamespace(trial_id=name), _result(t, acc, transparency)
        )

    assert act("a", 1, 0.1, 0.1) == "CONTINUE"  # before the rung: not judged
    assert act("a", 4, 0.80, 0.30) == "CONTINUE"  # first at the rung
    # A trial the only recorded one dominates: ceil(2/3) = 1 trial ahead of it: stopped (as ASHA
    # stops a second trial below the first).
    assert act("b", 4, 0.70, 0.20) == "STOP"
    # Less accurate but more transparent: on the front, it goes on (accuracy alone would stop it).
    assert act("c", 4, 0.60, 0.90) == "CONTINUE"
    # Four recorded, ceil(4/3) = 2: the two on the front are ahead of d: stopped.
    assert act("d", 4, 0.55, 0.25) == "STOP"
    assert act("e", 4, 0.50, 0.10) == "STOP"
    assert act("f", 4, 0.45, 0.05) == "STOP"
    # Seven recorded, ceil(7/3) = 3: dominated (by a alone), yet only two trials lie on better
    # fronts: it goes on.
    assert act("g", 4, 0.79, 0.29) == "CONTINUE"
    assert act("g", 5, 0.10, 0.10) == "CONTINUE"  # judged once per rung
    assert act("h", 12, 0.10, 0.10) == "STOP"  # max_t
    nan = s.on_trial_result(None, SimpleNamespace(trial_id="g"), _result(4, 0.9, math.nan))
    assert nan == "CONTINUE" and "u" not in s.rungs[0][1]  # an unscored result is not judged
    assert s.num_stopped == 5


def _outcome(run, acc, flops, transparency=math.nan):
    return TrialOutcome(run, {}, [8], 1e-3, acc, 10, flops, None, transparency=transparency)


def test_the_transparent_rule_takes_the_most_transparent_within_the_accuracy_band():
    trials = [
        _outcome("best-acc", 0.900, 500, 0.30),
        _outcome("clear", 0.895, 800, 0.60),
        _outcome("small", 0.893, 100, 0.60),
        _outcome("unscored", 0.899, 50),
        _outcome("outside", 0.850, 10, 0.95),
    ]
    assert select_champion(trials, 0.01, "transparent").run_id == "small"  # tie: fewer FLOPs
    assert select_champion(trials, 0.0, "transparent").run_id == "best-acc"
    assert select_champion(trials, 0.01, "accuracy").run_id == "unscored"  # fewest FLOPs
    assert select_champion(trials, 0.1, "transparent").run_id == "outside"
    with pytest.raises(ValueError, match="unknown champion rule"):
        select_champion(trials, 0.01, "loudest")


def _masks(n: int, size: int = 8) -> np.ndarray:
    masks = np.zeros((n, size, size), bool)
    masks[:, :4, :4] = True
    return masks


def test_a_layer_is_chosen_by_its_score_blank_maps_miss_and_a_map_that_survives_randomisation_is_not_chosen(
    monkeypatch,
):
    """Designed maps: layer a peaks in the mask with part of its mass outside; b is blank; c is
    better than a but the same on the randomised model (it shows the input, not the model)."""
    n, size = 10, 8
    inside = np.zeros((n, size, size), np.float32)
    inside[:, :4, :4] = 1.0
    half = inside.copy()
    half[:, 6:, 6:] = 0.9  # a second, smaller peak outside the mask
    maps = {"a": half, "b": np.zeros_like(inside), "c": inside}
    randomised = object()

    def fake_cams(model, images, layers, method, targets=None):
        k = len(images)
        if model is randomised:
            other = np.random.default_rng(0).random((k, size, size)).astype(np.float32)
            return {"a": other, "b": other, "c": maps["c"][:k]}, np.zeros(k, int), None
        return {name: maps[name][:k] for name in layers}, np.zeros(k, int), None

    monkeypatch.setattr(scoring, "layer_cams", fake_cams)
    monkeypatch.setattr(scoring, "_randomised", lambda model, seed: randomised)
    monkeypatch.setattr(scoring, "layer_output_size", lambda model, layer, size: (4, 4))
    images = np.zeros((n, 3, size, size), np.uint8)
    agree = inside.copy()
    result = score_transparency(
        object(), images, _masks(n), "hirescam", ["a", "b", "c"], teacher_maps=agree
    )
    assert result.basis == "localisation" and result.layer == "a"
    a, b, c = (result.layers[k] for k in "abc")
    assert a.pointing_game == 1.0 and a.energy_in_mask == pytest.approx(16 / (16 + 0.9 * 4))
    assert a.score == pytest.approx((1.0 + a.energy_in_mask) / 2)
    assert b.blank_rate == 1.0 and b.score == 0.0  # a blank map is a miss, not a tie
    assert c.score == 1.0 and c.randomisation == pytest.approx(1.0) and not c.passes_randomisation
    assert a.randomisation < 0.5 and a.teacher_agreement > 0.5
    metrics = result.metrics()
    assert metrics["transparency"] == a.score and metrics["transparency.blank_rate"] == 0.0
    assert "transparency.deletion" not in metrics  # not computed on the localisation basis
    # Round trip through cam.json.
    back = scoring.TransparencyScore.from_dict(result.to_dict())
    assert back.layer == "a" and back.layers["c"].randomisation == c.randomisation


def test_without_masks_the_score_is_faithfulness_and_a_real_model_is_scored(tmp_path):
    from kdray.models import StudentCNN

    from conftest import tiny_data

    data = tiny_data("brain_tumor", n_per_class=6, size=32)
    torch.manual_seed(0)
    model = StudentCNN(4, [4, 8, 8, 8]).eval()
    scoring_set = ScoringSet.from_split(data.splits["val"], 8, seed=0)
    without = ScoringSet(scoring_set.images, None)
    result = scoring.score_model(model, without, _cfg(), "gradcam", seed=0)
    assert result.basis == "faithfulness" and result.images == len(scoring_set.images)
    chosen = result.chosen
    assert 0.0 <= chosen.score <= 1.0 and math.isfinite(chosen.deletion)
    assert set(result.layers) == {"features.block1", "features.block2", "features.block3"}
    # The candidates: blocks of at least min_layer_side px (block4 is 2x2 at 32 px).
    assert scoring.candidate_layers(model, 32, 4) == list(result.layers)
    # cam.json beside a model, read back as the choice.
    scoring.save_cam_choice(tmp_path, result)
    assert scoring.load_cam_choice(tmp_path).layer == result.layer
    assert scoring.load_cam_choice(tmp_path / "nothing") is None


def _cfg():
    from kdray.config import TransparencyConfig

    return TransparencyConfig(images=8, sanity_images=4, faithfulness_images=4, deletion_steps=4)


@pytest.mark.integration
def test_a_two_objective_sweep_scores_every_trial_and_stops_only_dominated_ones(
    ray_local, tmp_path
):
    """A real Tune sweep (TPE over both objectives, ParetoASHA): every trial's run has its
    transparency at the rungs and the last epoch; every trial the scheduler stopped was
    dominated at its rung by another trial there (an accuracy-only ASHA stops trials that are
    not); the outcomes carry the checkpoint's score."""
    from mlflow import MlflowClient

    from kdray.config import ExperimentConfig, MLflowConfig
    from kdray.sweep import run_sweep
    from kdray.tracking import Tracker
    from kdray.trial import StudentJob, score_epochs
    from kdray.workspace import Workspace

    from conftest import tiny_data

    data = tiny_data("brain_tumor", n_per_class=10, size=32)
    cfg = ExperimentConfig.model_validate(
        {
            "data": {"image_size": 32},
            "student": {"epochs": 4, "batch_size": 8},
            "tune": {
                "num_samples": 6,
                "max_concurrent_trials": 1,  # one at a time: the same decisions every run
                "grace_period": 1,
                "reduction_factor": 2,
                "startup_trials": 3,
                "base_width": [4, 8],
                "depth": [2, 3],
            },
            "transparency": {"images": 16, "sanity_images": 4},
        }
    )
    ws = Workspace(tmp_path / "ws").create()
    tracker = Tracker.open(MLflowConfig(), ws)
    parent = tracker.start_run("parent", "brain_tumor", "parent")
    train, val = data.splits["train"], data.splits["val"]
    scoring_set = ScoringSet.from_split(val, 16)
    scoring_set.teacher_maps = np.random.default_rng(0).random(
        scoring_set.images.shape[:1] + (32, 32)
    )
    job = StudentJob(
        cfg,
        "brain_tumor",
        list(data.spec.classes),
        32,
        train,
        val,
        teacher_logits=np.random.default_rng(1).normal(size=(len(train), 4)).astype(np.float32),
        tracker=tracker,
        parent_run_id=parent,
        scoring=scoring_set,
    )
    outcomes = run_sweep(job, ws, "two-objectives")
    assert len(outcomes) == 6 and all(math.isfinite(o.transparency) for o in outcomes)
    assert score_epochs(cfg) == {0, 1, 3}  # rungs after epochs 1 and 2, and the last
    client = MlflowClient(tracker.tracking_uri)
    points: dict[int, dict[str, tuple[float, float]]] = {0: {}, 1: {}}
    stopped = {}
    for o in outcomes:
        history = {m.step: m.value for m in client.get_metric_history(o.run_id, "transparency")}
        accuracy = {
            m.step: m.value for m in client.get_metric_history(o.run_id, "best_val_accuracy")
        }
        assert set(history) == {e for e in score_epochs(cfg) if e < o.epochs_run}, o.run_id
        assert o.transparency == history[max(history)]  # the checkpoint's own score
        for rung in points:
            if rung in history:
                points[rung][o.run_id] = (accuracy[rung], history[rung])
        if o.epochs_run < 4:
            stopped[o.run_id] = o.epochs_run - 1  # the rung it was stopped at
    assert stopped, "no trial stopped: the scheduler never judged"
    for run_id, rung in stopped.items():
        mine = points[rung][run_id]
        assert any(dominates(p, mine) for r, p in points[rung].items() if r != run_id), run_id


def test_the_summary_says_what_the_champion_gains_and_gives_up_either_way():
    from kdray.pareto_report import ParetoSummary

    def line(champion_acc: float, pick_acc: float) -> str:
        return ParetoSummary(
            trials=4,
            scored=4,
            front=["a", "b"],
            rule="transparent",
            tolerance=0.01,
            champion={"val_accuracy": champion_acc, "transparency": 0.64},
            accuracy_pick={"val_accuracy": pick_acc, "transparency": 0.60},
            same_pick=False,
        ).sentence()

    assert "(+0.040), for 0.005 of validation accuracy (0.965 against 0.970" in line(0.965, 0.970)
    # The accuracy-only pick is the smallest model within the band: it can be the less accurate.
    assert "(+0.040), and 0.003 more validation accuracy (0.972 against 0.969" in line(0.972, 0.969)
    assert "at the same validation accuracy" in line(0.97, 0.97)
