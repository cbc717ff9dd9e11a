"""Run the kdray experiment: teacher (Ray Train) -> KD sweep (Ray Tune) -> MLflow. See --help."""

import sys

from kdray.cli import main

if __name__ == "__main__":
    sys.exit(main())
