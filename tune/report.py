"""Rebuild the transparency reports of a finished run (no training). See --help."""

import sys

from kdray.cli import report_main

if __name__ == "__main__":
    sys.exit(report_main())
