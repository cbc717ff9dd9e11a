"""The Ray a kdray command runs on: a cluster to join, else a private local Ray it shuts down.

Shared by ``kdray run`` (the pipeline), ``kdray audit`` and the benchmarks that start Ray.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import ray

from kdray.config import RayConfig
from kdray.workspace import Workspace

__all__ = ["ray_session"]


@contextmanager
def ray_session(cfg: RayConfig, ws: Workspace) -> Iterator[None]:
    """Join ``ray.address`` / ``$RAY_ADDRESS``, else start a private local Ray; shut down what we started."""
    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ctrl-C stops the driver at once (KeyboardInterrupt); --resume continues from Tune's
    # periodically saved state, as after a kill, instead of Tune's own half-way shutdown.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # Ray starts workers at nice 15; on a machine shared with other work that starves the
        # training processes (seen here: a 7x slower teacher epoch). kdray's own local Ray
        # runs them at normal priority unless the user sets RAY_worker_niceness.
        os.environ.setdefault("RAY_worker_niceness", "0")
        # address="local" never attaches to another Ray that happens to run on this machine.
        # The dashboard serves Ray's State API, which Ray Train's PlacementGroupCleaner asks
        # every second whether the Train controller still lives: without it the cleaner cannot
        # clean up after a dead controller and warns on every check (dozens of lines per fit).
        # It listens on 127.0.0.1 (8265, or the next free port).
        ray.init(
            address="local",
            num_cpus=cfg.num_cpus,
            include_dashboard=True,
            _temp_dir=cfg.temp_dir or f"/tmp/kdray-ray-{os.getuid()}",
        )
    try:
        yield
    finally:
        ray.shutdown()
