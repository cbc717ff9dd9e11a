"""The one directory that holds a run's state: data, manifests, caches, models, MLflow, Ray."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Workspace", "resolve_workspace"]

ENV_VAR = "KDRAY_HOME"


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

    def ray_storage(self, override: str | None = None) -> str:
        """Where Ray Train / Tune persist runs: ``override`` (a shared path or URI) or local."""
        return override or str(self.ray_results)
