"""The one directory that holds a run's state: data, manifests, caches, models, MLflow, Ray."""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Workspace", "WorkspaceError", "resolve_workspace"]

ENV_VAR = "KDRAY_HOME"
MIN_FREE_ENV = "KDRAY_MIN_FREE_MB"
MIN_FREE_MB = 256  # a full disk, not a tight one: a smoke run writes about 100 MB


class WorkspaceError(RuntimeError):
    """The workspace cannot hold a run (not writable, disk full); the message says which."""


def resolve_workspace(path: str | Path | None = None) -> Path:
    """``path`` if given, else ``$KDRAY_HOME``, else ``./workspace``; always absolute."""
    chosen = path if path is not None else os.environ.get(ENV_VAR) or "workspace"
    return Path(chosen).expanduser().resolve()


@dataclass(frozen=True)
class Workspace:
    """Paths inside the workspace. Creating the object touches nothing; :meth:`create` does."""

    root: Path

    @classmethod
    def at(cls, path: str | Path | None = None) -> Workspace:
        return cls(resolve_workspace(path))

    def create(self) -> Workspace:
        self.root.mkdir(parents=True, exist_ok=True)
        return self

    def check(self, min_free_mb: int | None = None) -> Workspace:
        """Create the workspace and make sure a run can write there, before any work starts.

        Args:
            min_free_mb: free space required (default ``$KDRAY_MIN_FREE_MB``, else 256).

        Raises:
            WorkspaceError: the folder cannot be created or written (read-only, permissions),
                or the disk under it has less free space than ``min_free_mb``.
        """
        try:
            self.create()
            probe = self.root / f".kdray-write-check-{uuid.uuid4().hex}"
            probe.write_bytes(b"kdray")
            probe.unlink()
        except OSError as exc:
            raise WorkspaceError(
                f"workspace {self.root} is not writable: {exc.strerror or exc}; "
                "choose another with --workspace or $KDRAY_HOME"
            ) from None
        need = (
            int(os.environ.get(MIN_FREE_ENV, MIN_FREE_MB)) if min_free_mb is None else min_free_mb
        )
        free = shutil.disk_usage(self.root).free / 2**20
        if free < need:
            raise WorkspaceError(
                f"only {free:.0f} MB free on the disk of workspace {self.root}; a run "
                f"needs at least {need} MB (${MIN_FREE_ENV} changes this)"
            )
        return self

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def manifests(self) -> Path:
        return self.root / "manifests"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def teachers(self) -> Path:
        return self.root / "teachers"

    @property
    def champions(self) -> Path:
        return self.root / "champions"

    @property
    def edge(self) -> Path:
        """The champions' ONNX exports (``tune/export.py``), one folder per dataset."""
        return self.root / "edge"

    @property
    def ray_results(self) -> Path:
        return self.root / "ray_results"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def logs(self) -> Path:
        """``tune/run.py``'s full console logs (Ray, Tune, MLflow), one file per run."""
        return self.root / "logs"

    def ray_storage(self, override: str | None = None) -> str:
        """Where Ray Train / Tune persist runs: ``override`` (a shared path or URI) or local."""
        return override or str(self.ray_results)
