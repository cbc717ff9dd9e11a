"""The server's settings: the ``args`` of the application in ``serve/config.yaml``.

Strict like the experiment config: an unknown key or a bad value stops the application build
with a message naming the key.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from kdray.config import ConfigError, ExplainConfig, StrictModel
from kdray.data.specs import DATASETS
from kdray.workspace import resolve_workspace

__all__ = ["SERVE_MAX_PIXELS", "ServeSettings", "load_settings"]

# The models take 32-224 px: 16 MP (4096 x 4096, a large fundus photo) is more than any input
# needs, and one such RGB image decodes to 48 MB (kdray.data.images allows 64 MP for datasets).
SERVE_MAX_PIXELS = 16_777_216


class ServeSettings(StrictModel):
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
        SERVE_MAX_PIXELS,
        ge=1,
        description="one image's size limit, width x height, read from its header: 413 above",
    )
    max_decode_pixels: int = Field(
        64_000_000,
        ge=1,
        description="pixels being decoded at once in a Gateway replica, all requests together: "
        "503 + Retry-After beyond (an image alone is always admitted)",
    )
    max_infer_batch: int = Field(
        64, ge=1, le=4096, description="images in one Open Inference Protocol request: 413 above"
    )
    request_timeout_s: float = Field(30.0, gt=0, description="server-side deadline of one request")
    shap_nsamples: int = Field(50, ge=1, description="SHAP samples when a request names none")
    max_shap_nsamples: int = Field(200, ge=1, description="upper bound a request may ask for")
    auth: Literal["token", "none"] = Field(
        "token",
        description="token: API routes need 'Authorization: Bearer <$token_env>', and a replica "
        "whose variable is missing or empty refuses to start; none: no auth (loopback only)",
    )
    token_env: str = Field(
        "KDRAY_SERVE_TOKEN", description="env var holding the bearer token (auth: token)"
    )
    runtime: Literal["onnx", "torch"] = Field(
        "onnx",
        description="what the Gateway predicts with: onnx, the champion's exported predict.onnx "
        "on onnxruntime (checked against the registered torch weights at load; a version "
        "without an export, or one that differs, falls back to torch and says so in its card), "
        "or torch. With onnx the Explainer also takes a student's feature maps and Grad-CAM of "
        "its prediction from the exported explain graph (checked against torch at load); SHAP, "
        "a chosen target and the teachers run on torch",
    )
    reload_interval_s: float | None = Field(
        30.0,
        gt=0,
        description="poll the registry this often; a version the alias moved to is loaded beside "
        "the one serving, checked, and swapped in without a restart (never when it fails to load "
        "or a check: the old one keeps serving, /readyz and the card say why); null: never",
    )
    audit_experiment: str = Field(
        "kdray-audit",
        description="MLflow experiment the viewer lists dataset audits from (tune/audit.py logs "
        "to '<mlflow.experiment>-audit')",
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
        """The bearer token (never logged); None with ``auth: none``.

        Raises:
            ConfigError: ``auth: token`` and the variable is missing or blank in this process. A
                replica raises it from its constructor, so it refuses to start instead of
                serving the API open (``serve deploy`` carries no variable from the deployer's
                shell: set it in ``runtime_env.env_vars`` or from a mounted secret).
        """
        if self.auth == "none":
            return None
        value = os.environ.get(self.token_env, "")
        if not value.strip():
            raise ConfigError(
                f"args.auth is 'token' but ${self.token_env} is "
                f"{'empty' if self.token_env in os.environ else 'not set'} in this replica's "
                "environment: set it (serve config runtime_env.env_vars, or a secret), or set "
                "args.auth: none to serve the API without auth"
            )
        return value

    def auth_mode(self) -> str:
        """What the start-up log says about auth (never the token)."""
        if self.auth == "none":
            return "auth: none - the API answers anyone who reaches the port"
        return f"auth: bearer token from ${self.token_env}"


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
