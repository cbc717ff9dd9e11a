"""Tracker.log_inputs: the race on a dataset's first link is retried, other errors are not."""

from __future__ import annotations

import pytest
from mlflow.exceptions import MlflowException

from kdray.tracking import Tracker


class _Client:
    """Fails ``log_inputs`` with the given errors, in order, then succeeds."""

    def __init__(self, *errors: Exception) -> None:
        self.errors, self.calls = list(errors), 0

    def log_inputs(self, run_id: str, inputs: list) -> None:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)


@pytest.fixture()
def tracker_with(monkeypatch):
    def make(client: _Client) -> Tracker:
        monkeypatch.setattr(Tracker, "client", property(lambda self: client))
        return Tracker("sqlite:////nowhere/mlflow.db", "0")

    return make


def test_a_lost_race_on_a_new_dataset_row_is_tried_again(tracker_with):
    # What two trials that link the same new dataset at once got from MLflow's SQL store.
    race = MlflowException(
        "(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, "
        "datasets.name, datasets.digest"
    )
    client = _Client(race, race)
    tracker_with(client).log_inputs("run", [])
    assert client.calls == 3


def test_other_errors_are_not_retried_and_a_lasting_race_ends_in_its_error(tracker_with):
    client = _Client(MlflowException("RESOURCE_DOES_NOT_EXIST: run 'x' not found"))
    with pytest.raises(MlflowException, match="not found"):
        tracker_with(client).log_inputs("run", [])
    assert client.calls == 1
    client = _Client(*[MlflowException("UNIQUE constraint failed")] * 5)
    with pytest.raises(MlflowException, match="UNIQUE"):
        tracker_with(client).log_inputs("run", [], attempts=5)
    assert client.calls == 5
