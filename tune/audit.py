"""Audit a whole dataset on Ray Data: every image predicted and explained by the registered
student and its teacher, and the cases to look at first. See --help."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kdray.audit.cli import audit_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(audit_main())
