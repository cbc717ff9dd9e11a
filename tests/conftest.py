from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

# Tests share the machine with other work: keep torch to one thread unless a test says otherwise.
torch.set_num_threads(1)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture()
def workspace(tmp_path: Path):
    from kdray.workspace import Workspace

    return Workspace(tmp_path / "ws").create()


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One real local Ray for the in-process integration tests, in its own temp dir."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # test-only: local cluster without tokens
    temp_dir = f"/tmp/kdray-test-ray-{os.getpid()}"
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp_dir,
             log_to_driver=False)
    yield
    ray.shutdown()


def tiny_data(dataset: str = "eye_disease", n_per_class: int = 8, size: int = 32, seed: int = 0):
    """Synthetic data in memory: half train, a quarter each val and test, masks included."""
    from kdray.data.prepare import in_memory_synthetic

    return in_memory_synthetic(dataset, n_per_class, size, seed)
