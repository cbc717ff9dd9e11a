"""The server's settings: the ``args`` of the application in ``serve/config.yaml``.

Strict like the experiment config: an unknown key or a bad value stops the application build
with a message naming the key.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import Field, ValidationError, field_validator

from kdray.config import ConfigError, ExplainConfig, _Strict
from kdray.data.images import MAX_PIXELS
from kdray.data.specs import DATASETS
from kdray.workspace import resolve_workspace

__all__ = ["ServeSettings", "load_settings"]


class ServeSettings(_Strict):
    """What the server loads and the limits it enforces.

    The tracking URI falls back like ``tune/run.py``'s: ``$MLFLOW_TRACKING_URI``, else the SQLite
    file of the workspace (``$KDRAY_HOME``, else ``./workspace``) that ``make run`` filled.
    """

    tracking_uri: str | None = Field(
        None, description="None: $MLFLOW_TRACKING_URI, else the workspace's SQLite"
    )
    datasets: list[str] | None = Field(
        None, description="datasets to serve; None: every dataset with a registered champion"
    )
    alias: str = Field("champion", description="registry alias of the versions served")
    teacher: bool = Field(True, description="also load the teachers (model=teacher|both)")
    max_body_mb: float = Field(10.0, gt=0, le=1024, description="request bodies above this get 413")
    max_pixels: int = Field(
        MAX_PIXELS, ge=1, description="decoded image size limit (checked in the header)"
    )
    request_timeout_s: float = Field(30.0, gt=0, description="server-side deadline of one request")
    shap_nsamples: int = Field(50, ge=1, description="SHAP samples when a request names none")
    max_shap_nsamples: int = Field(200, ge=1, description="upper bound a request may ask for")
    token_env: str = Field(
        "KDRAY_SERVE_TOKEN", description="env var holding the optional bearer token"
    )
    explain: ExplainConfig = Field(default_factory=ExplainConfig)

    @field_validator("datasets")
    @classmethod
    def _known(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            unknown = [d for d in value if d not in DATASETS]
            if unknown or not value:
                raise ValueError(
                    f"unknown or no dataset ids {unknown}; expected ids from {sorted(DATASETS)}"
                )
        return value

    def resolved_tracking_uri(self) -> str:
        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        return uri or f"sqlite:///{resolve_workspace() / 'mlflow.db'}"

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    def token(self) -> str | None:
        """The bearer token, read from the environment at call time (never logged)."""
        return os.environ.get(self.token_env) or None


def load_settings(args: dict[str, Any] | None) -> ServeSettings:
    """Validate the application ``args``.

    Raises:
        ConfigError: names each bad key (``args.max_body_mb: ...``).
    """
    try:
        return ServeSettings.model_validate(args or {})
    except ValidationError as exc:
        lines = [f"  args.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        raise ConfigError("invalid serve application args:\n" + "\n".join(lines)) from None
