"""Run the kdray experiment: teacher (Ray Train) -> KD sweep (Ray Tune) -> MLflow. See --help."""

import sys
from pathlib import Path

# A checkout runs without `pip install -e .` (e.g. `ray job submit --working-dir .`, where only
# the dependencies are installed on the cluster): kdray is imported from the checkout itself.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kdray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
