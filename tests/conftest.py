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
    """A PreparedData-like object built from the synthetic generator, in memory."""
    from kdray.data.prepare import Manifest, PreparedData, Split
    from kdray.data.specs import get_spec
    from kdray.data.synthetic import make_arrays

    spec = get_spec(dataset)
    images, labels, masks = make_arrays(dataset, n_per_class, size, seed)
    images = images.transpose(0, 3, 1, 2).copy()
    order = list(range(len(labels)))
    splits = {}
    for name, part in (("train", order[0::2]), ("val", order[1::4]), ("test", order[3::4])):
        splits[name] = Split(images[part], labels[part], masks[part])
    manifest = Manifest(dataset, "memory", None, list(spec.classes), f"tiny{seed}{n_per_class}{size}".ljust(12, "0"))
    return PreparedData(spec, manifest, size, splits)
