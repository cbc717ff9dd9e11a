"""The report's learning curves: read back from a dataset's MLflow runs (real MLflow, SQLite)."""

from __future__ import annotations

from kdray.config import MLflowConfig
from kdray.tracking import Tracker
from kdray.transparency import learning_curves
from kdray.workspace import Workspace


def test_learning_curves_follow_the_parent_runs_tags_to_the_trials(tmp_path) -> None:
    tracker = Tracker.open(MLflowConfig(), Workspace(tmp_path / "ws").create())
    parent = tracker.start_run("brain_tumor", "brain_tumor", "dataset")
    teacher = tracker.start_run("teacher", "brain_tumor", "teacher", parent)
    for epoch, acc in enumerate([0.5, 0.7, 0.9]):
        tracker.log_metrics(teacher, {"val_accuracy": acc}, step=epoch)
    tracker.log_metrics(teacher, {"val_accuracy": 0.8}, step=2)  # a resume logged epoch 2 again
    trial = tracker.start_run("trial", "brain_tumor", "trial", parent)
    for epoch, acc in [(1, 0.6), (0, 0.4)]:  # logged out of order
        tracker.log_metrics(trial, {"val_accuracy": acc}, step=epoch)
    champion = tracker.start_run(
        "champion", "brain_tumor", "champion", parent, tags={"kdray.source_trial_run": trial}
    )
    tracker.log_metrics(champion, {"val_accuracy": 0.99})  # the champion run's summary, not a curve
    assert learning_curves(tracker, parent) == {}  # no tags yet
    tracker.set_tags(parent, {"kdray.teacher_run": teacher, "kdray.champion_run": champion})
    assert learning_curves(tracker, parent) == {"teacher": [0.5, 0.7, 0.8], "student": [0.4, 0.6]}
    baseline_trial = tracker.start_run("baseline-trial", "brain_tumor", "baseline-trial", parent)
    tracker.log_metrics(baseline_trial, {"val_accuracy": 0.3}, step=0)
    baseline = tracker.start_run(
        "baseline",
        "brain_tumor",
        "baseline",
        parent,
        tags={"kdray.source_trial_run": baseline_trial},
    )
    tracker.set_tags(parent, {"kdray.baseline_run": baseline})
    assert learning_curves(tracker, parent)["baseline"] == [0.3]
