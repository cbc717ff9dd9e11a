"""kdray.train_cleaner: a fit's placement group is removed when its controller dies, not when a
State API answer merely lacks the controller (the cause of the Ray Train fault test's failure).

The cleaners run as real detached Ray actors on the session's Ray. Their State API is pointed at a
stand-in dashboard that knows no actor, as another Ray's dashboard on 127.0.0.1:8265 answers
(``RAY_API_SERVER_ADDRESS``, which Ray's State API client reads first).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytestmark = pytest.mark.integration


class _NoSuchActor(BaseHTTPRequestHandler):
    """A dashboard's State API that has never heard of the actor asked about."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = json.dumps(
            {
                "result": True,
                "msg": "",
                "data": {
                    "result": {
                        "result": [],
                        "total": 0,
                        "num_after_truncation": 0,
                        "num_filtered": 0,
                        "partial_failure_warning": "",
                        "warnings": None,
                    }
                },
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def other_dashboard():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NoSuchActor)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _state(pg) -> str:
    import ray

    return ray.util.placement_group_table(pg).get("state", "REMOVED")


def _wait_for(what, timeout: float = 60.0) -> bool:
    # Generous: in the suite both cores are busy and a check can take seconds; a pass is quick.
    deadline = time.time() + timeout
    while time.time() < deadline:
        if what():
            return True
        time.sleep(0.2)
    return False


def _cleaner(cls, controller_id: str, dashboard: str, pg):
    """A cleaner actor monitoring ``pg``. Keep the handle: a dropped one kills the actor, racing
    its first check (under load the kill won and Ray's cleaner never removed the group: a CI
    failure)."""
    import ray

    actor = (
        ray.remote(num_cpus=0)(cls)
        .options(runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": dashboard}})
        .remote(
            controller_actor_id=controller_id,
            check_interval_s=0.2,
            get_actor_timeout_s=2,
            stop_timeout=2.0,
        )
    )
    ray.get(actor.register_placement_group.remote(pg))
    ray.get(actor.start_monitoring.remote())
    return actor


def test_only_a_dead_controller_loses_its_placement_group(ray_local, other_dashboard):
    import ray
    from ray.train.v2._internal.execution.controller.placement_group_cleaner import (
        PlacementGroupCleaner,
    )
    from ray.util.placement_group import placement_group, remove_placement_group

    from kdray.train_cleaner import ConfirmingCleaner

    @ray.remote(num_cpus=0)
    class Controller:
        def ping(self) -> int:
            return 1

    controller = Controller.remote()
    ray.get(controller.ping.remote())
    controller_id = controller._actor_id.hex()
    ours_pg, rays_pg = (placement_group([{"CPU": 0.01}]) for _ in range(2))
    ray.get([ours_pg.ready(), rays_pg.ready()])
    try:
        # Ray 2.60's cleaner: the controller lives, the answer lacks it, the group goes. If a Ray
        # upgrade stops this, kdray.train_cleaner can go (this assertion says so).
        _held = _cleaner(PlacementGroupCleaner, controller_id, other_dashboard, rays_pg)
        assert _wait_for(lambda: _state(rays_pg) == "REMOVED"), _state(rays_pg)

        ours = _cleaner(ConfirmingCleaner, controller_id, other_dashboard, ours_pg)
        time.sleep(3)  # 15 checks
        assert _state(ours_pg) == "CREATED"
        assert ray.get(ours.register_placement_group.remote(ours_pg)) is None  # still monitoring

        # The controller dies: its group goes, as Ray's cleaner promises.
        ray.kill(controller)
        assert _wait_for(lambda: _state(ours_pg) == "REMOVED"), _state(ours_pg)
    finally:
        for pg in (ours_pg, rays_pg):
            if _state(pg) != "REMOVED":
                remove_placement_group(pg)


def test_the_teacher_trainer_runs_the_confirming_cleaner_and_everything_else_of_rays(tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import (
        PlacementGroupCleanerCallback,
    )

    from kdray.teacher import TeacherTrainer
    from kdray.train_cleaner import ConfirmingCleanerCallback

    def loop(config: dict) -> None:
        pass

    def make(cls):
        return cls(
            loop,
            scaling_config=ScalingConfig(num_workers=1),
            run_config=RunConfig(name="t", storage_path=str(tmp_path)),
        )

    ours, rays = (
        make(TeacherTrainer)._create_default_callbacks(),
        make(TorchTrainer)._create_default_callbacks(),
    )
    assert [type(cb) for cb in ours] == [
        ConfirmingCleanerCallback if t is PlacementGroupCleanerCallback else t
        for t in map(type, rays)
    ]
    assert PlacementGroupCleanerCallback in map(type, rays)


def test_controller_alive_reads_the_gcs_record(monkeypatch):
    from kdray import train_cleaner

    records = {"a": {"State": "ALIVE"}, "d": {"State": "DEAD"}, "r": {"State": "RESTARTING"}}
    monkeypatch.setattr(
        train_cleaner.gcs_state, "actors", lambda actor_id: records.get(actor_id, {})
    )
    assert [train_cleaner.controller_alive(k) for k in ("a", "d", "r", "missing")] == [
        True,
        False,
        True,
        True,
    ]

    def busy(actor_id: str) -> dict:
        raise TimeoutError("GCS busy")

    monkeypatch.setattr(train_cleaner.gcs_state, "actors", busy)
    assert train_cleaner.controller_alive("a")
