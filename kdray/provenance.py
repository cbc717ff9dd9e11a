"""Which kdray code ran a run: a digest of the package's source, tagged on every MLflow run.

On a cluster reached with ``ray job submit --working-dir .`` the workers import the kdray that
the job shipped, not one installed on the node; the tag ``kdray.source_digest`` on each run
(computed in the process that ran it) shows that every trial ran the same code as the driver.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

__all__ = ["SOURCE_TAG", "source_digest"]

SOURCE_TAG = "kdray.source_digest"


@functools.cache
def source_digest() -> str:
    """First 12 hex digits of the SHA-256 over kdray's ``*.py`` files (relative paths and bytes),
    as imported by this process."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(
            path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0"
        )
    return digest.hexdigest()[:12]
