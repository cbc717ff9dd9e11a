"""Rebuild the transparency reports of a finished run (no training). See --help."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kdray.cli import report_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(report_main())
