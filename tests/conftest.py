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
