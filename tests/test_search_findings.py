"""What the search found: importances from the trials that ran, the seed point, the panels."""

from __future__ import annotations

import numpy as np
import pytest

from kdray.search_findings import (
    MIN_TRIALS,
    TrialPoint,
    across_datasets,
    find,
    importances,
    markdown,
    panels_figure,
)


def _search(score, n: int = 40, seed: int = 0) -> list[TrialPoint]:
    """A constructed search: random points, the score a function of the point."""
    rng = np.random.default_rng(seed)
    points = []
    for i in range(n):
        alpha, t, lr = rng.uniform(0.05, 0.95), rng.uniform(1, 20), 10 ** rng.uniform(-3, -2)
        base, depth = int(rng.choice([8, 16, 24])), int(rng.choice([4, 5, 6]))
        widths = [base * 2 ** min(k, 3) for k in range(depth)]
        p = TrialPoint(f"r{i}", alpha, t, lr, widths, 0.0, epochs_run=12, first=i == 0)
        p.val_accuracy = score(p)
        points.append(p)
    return points


def test_a_search_where_only_alpha_matters_ranks_alpha_first():
    points = _search(lambda p: 0.9 - 0.5 * (p.alpha - 0.3) ** 2)
    found = importances(points)
    assert list(found)[0] == "alpha"
    assert found["alpha"] > 0.8
    assert sum(found.values()) == pytest.approx(1.0)


def test_a_search_where_only_depth_matters_ranks_depth_first():
    points = _search(lambda p: 0.5 + 0.1 * p.depth, seed=1)
    assert list(importances(points))[0] == "depth"


def test_importances_only_over_what_was_searched_and_only_with_enough_trials():
    fixed = _search(lambda p: p.alpha)
    for p in fixed:
        p.widths = [16, 32, 64, 128, 128]  # student.widths set: widths not searched
    found = importances(fixed)
    assert set(found) == {"alpha", "temperature", "lr"}
    assert importances(fixed[: MIN_TRIALS - 1]) == {}
    flat = _search(lambda p: 0.5)
    assert importances(flat) == {}  # every trial scored the same: nothing to attribute


def test_findings_name_the_best_trial_and_the_seed_points_rank():
    points = _search(lambda p: p.alpha, n=10)
    f = find(points)
    best = max(points, key=lambda p: p.val_accuracy)
    assert f.best["run_id"] == best.run_id and f.trials == 10
    assert f.seed_rank == 1 + sum(p.val_accuracy > points[0].val_accuracy for p in points)
    points[3].epochs_run = 3
    assert find(points).stopped_early == 1
    text = markdown(f, "brain_tumor", "search.png")
    assert "rank" in text and "search.png" in text and "| alpha |" in text
    assert f"ranks {f.seed_rank} of 10" in f.sentence()


def test_panels_mark_the_champion_and_the_seed_point():
    points = _search(lambda p: p.alpha, n=8)
    fig = panels_figure(points, points[5].run_id, "x")
    labels = {t.get_text() for t in fig.legends[0].get_texts()}
    assert {"champion", "seed", "ran all epochs"} <= labels
    assert len(fig.axes) == 5


def test_across_datasets_states_whether_the_best_settings_agree():
    same = [
        ("a", {"best": {"alpha": 0.5, "temperature": 4.0}}),
        ("b", {"best": {"alpha": 0.6, "temperature": 6.0}}),
    ]
    assert "they agree" in across_datasets(same)
    apart = [*same, ("c", {"best": {"alpha": 0.1, "temperature": 4.0}})]
    assert "they differ" in across_datasets(apart)
    assert "nothing to compare" in across_datasets(same[:1])


def test_the_seed_point_is_the_trial_that_ran_the_first_point_not_the_oldest_run(tmp_path):
    """Two trials start at once: the run created first need not be the search's first point."""
    from kdray.config import ExperimentConfig, MLflowConfig
    from kdray.search_findings import trials_from_mlflow
    from kdray.sweep import seed_point
    from kdray.tracking import Tracker
    from kdray.workspace import Workspace

    cfg = ExperimentConfig()
    first = seed_point(cfg)
    tracker = Tracker.open(MLflowConfig(), Workspace(tmp_path / "ws").create())
    parent = tracker.start_run("parent", "brain_tumor", "parent")
    for i, alpha in enumerate((0.3, first["alpha"], 0.8)):  # the seed point's run is the 2nd
        point = {**first, "alpha": alpha}
        run = tracker.start_run(f"t{i}", "brain_tumor", "trial", parent)
        tracker.log_params(run, {**point, "widths": "-".join(map(str, point["widths"]))})
        tracker.log_metrics(run, {"best_val_accuracy": 0.5 + i / 10}, step=0)
    points = trials_from_mlflow(tracker, parent, seed_point=first)
    assert len(points) == 3 and [p.alpha for p in points if p.first] == [first["alpha"]]
    oldest = trials_from_mlflow(tracker, parent)  # no hint: the oldest run
    assert oldest[0].first and sum(p.first for p in oldest) == 1
