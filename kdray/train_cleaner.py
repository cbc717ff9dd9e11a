"""Ray Train's placement-group cleaner, made to remove a fit's group only when its controller died.

Ray Train 2.60 starts a detached ``PlacementGroupCleaner`` beside every fit's controller. Each
second it asks Ray's State API whether the controller lives and removes the fit's placement group
when it does not. Its check (``ray.train.v2._internal.state.util.is_actor_alive``) reads "the
actor is not in the answer" as dead, and the State API is an HTTP call to whichever dashboard the
cleaner's process finds: a Ray without a dashboard falls back to ``127.0.0.1:8265``, which on a
machine running a second Ray (a second kdray run, ``make serve``, a test beside another) is the
other cluster's dashboard. That one has never heard of the controller, so the cleaner removes a
live fit's placement group, the worker group dies ("Destroying worker since its placement group
was removed") and the fit spends one of ``teacher.max_failures`` on nothing, or fails. Seen in
this project's fault test (tests/test_teacher.py) while another test's Ray served 8265; the same
"missing means dead" reading is named in review of ray-project/ray#65447.

:func:`confirming_cleaner` swaps the cleaner's callback in a trainer's callbacks (kdray.teacher's
``TeacherTrainer``) for one whose cleaner asks its own cluster's GCS (the process's own Ray
connection: no dashboard, no other cluster) and removes the group only on a DEAD record. A record
it cannot read is no death: it asks again a second later. Everything else is Ray's. Private Ray
APIs, pinned to Ray 2.60 in pyproject.toml; tests/test_train_cleaner.py fails when an upgrade
changes them. This module imports no torch: the cleaner's process imports this module (to run
:class:`ConfirmingCleaner`) and nothing else of kdray.
"""

from __future__ import annotations

from typing import Any

from ray._private import state as gcs_state
from ray.train.v2._internal.callbacks import placement_group_callback
from ray.train.v2._internal.execution.controller import placement_group_cleaner

__all__ = [
    "ConfirmingCleaner",
    "ConfirmingCleanerCallback",
    "confirming_cleaner",
    "controller_alive",
]


def controller_alive(actor_id: str, timeout: float = 0) -> bool:
    """False only when this cluster's GCS records the actor as DEAD (``timeout``: Ray's signature)."""
    try:
        record = gcs_state.actors(actor_id)
    except Exception:  # GCS busy or restarting: not a death; the cleaner asks again
        return True
    return record.get("State") != "DEAD"


class ConfirmingCleaner(placement_group_cleaner.PlacementGroupCleaner):
    """Ray's cleaner with :func:`controller_alive` as its check (in this actor's own process)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # The monitor loop looks the check up in its module; this actor owns its process.
        placement_group_cleaner.is_actor_alive = controller_alive
        super().__init__(*args, **kwargs)


class ConfirmingCleanerCallback(placement_group_callback.PlacementGroupCleanerCallback):
    """Ray's callback, launching :class:`ConfirmingCleaner` instead of Ray's cleaner."""

    def after_controller_start(self, train_run_context: Any) -> None:
        # Runs in the controller actor's own process, which launches the cleaner from its module.
        placement_group_callback.PlacementGroupCleaner = ConfirmingCleaner
        super().after_controller_start(train_run_context)


def confirming_cleaner(callbacks: list) -> list:
    """A trainer's default callbacks with Ray's placement-group cleaner's swapped for ours."""
    return [
        ConfirmingCleanerCallback()
        if type(cb) is placement_group_callback.PlacementGroupCleanerCallback
        else cb
        for cb in callbacks
    ]
