"""Export a registered student to ONNX (predict + explain without torch). See --help."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kdray.edge.cli import export_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(export_main())
