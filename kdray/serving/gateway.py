"""The Gateway replica's state and the request helpers its routes share.

:class:`GatewayCore` loads the students (predicted here, batched), holds the handles to the
explainer deployments and the readiness board, and answers the questions every route asks: is
the request authorised, is the dataset's model loaded (its card), did the work finish within the
request's deadline, what is the uploaded image. The routes themselves are declared on
:class:`kdray.serving.app.Gateway`, its subclass.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import Any

import torch
from fastapi import Request
from fastapi.responses import JSONResponse
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponse
from starlette.concurrency import run_in_threadpool

from kdray.audit.browse import AuditBrowser, AuditNotFound
from kdray.data.specs import DATASETS
from kdray.devices import assigned_cpus, assigned_device, use_assigned_threads
from kdray.explain.gradcam import ExplainError
from kdray.serving.deployments import BatchPredictor, store_status
from kdray.serving.errors import ApiError
from kdray.serving.oip import OipError, split_model_name
from kdray.serving.readiness import ReadinessBoard, merge_cards, serve_health
from kdray.serving.settings import load_settings
from kdray.serving.store import ModelStore, ModelUnavailable, redact
from kdray.serving.timings import Timings
from kdray.serving.uploads import PixelBudget, UploadError, decode_upload, read_upload

__all__ = ["GatewayCore"]


class GatewayCore:
    """The Gateway's replica: its settings, students, explainer handles and shared helpers.

    Args:
        explainer: the Explainer deployment (feature maps, Grad-CAM, teachers' predictions).
        shap_explainer: the ShapExplainer deployment.
        settings: :class:`~kdray.serving.settings.ServeSettings` fields.
    """

    def __init__(
        self,
        explainer: DeploymentHandle,
        shap_explainer: DeploymentHandle,
        settings: dict[str, Any],
    ) -> None:
        self.settings = load_settings(settings)
        # Read once, first: with auth: token a missing variable stops this replica's start
        # before it loads anything (fail closed, never an open API).
        self._token = self.settings.token()
        # Serve's own logger: the line lands in the replica's log and `serve run`'s output.
        logging.getLogger("ray.serve").info("kdray gateway: %s", self.settings.auth_mode())
        self._uri = self.settings.resolved_tracking_uri()
        self._budget = PixelBudget(self.settings.max_decode_pixels)
        device = assigned_device()
        store = ModelStore(
            self._uri,
            self.settings.datasets,
            self.settings.alias,
            ("student",),
            device=device,
            channels_last=True,
            # onnxruntime's CPU provider, one thread per predict worker (one worker per CPU, as
            # for torch below); on a GPU the torch model predicts.
            runtime=self.settings.runtime if device.type == "cpu" else "torch",
            onnx_threads=1,
            reload_interval_s=self.settings.reload_interval_s,  # a new champion, no restart
        )
        # CPU: one forward pass per CPU of this replica, one torch thread each; GPU: one at a time.
        workers = 1 if device.type == "cuda" else assigned_cpus()
        torch.set_num_threads(1 if workers > 1 else use_assigned_threads())
        self.predictor = BatchPredictor(store, workers)
        self.explainer, self.shap = explainer, shap_explainer
        self._cards: dict[str, dict[str, Any]] = {}
        self._audits = AuditBrowser(self._uri, self.settings.audit_experiment)
        self._board = ReadinessBoard(
            {
                "Explainer": lambda: self.explainer.status.remote(),
                "ShapExplainer": lambda: self.shap.status.remote(),
            },
            health=serve_health,
        )

    def __del__(self) -> None:  # Serve calls it when the replica shuts down
        predictor = getattr(self, "predictor", None)  # None: __init__ failed (e.g. auth)
        if predictor is not None:
            predictor.store.close()
        audits = getattr(self, "_audits", None)
        if audits is not None:
            audits.close()

    def reconfigure(self, config: dict[str, Any]) -> None:
        """``user_config``: ``max_batch_size`` (1 turns batching off), ``batch_wait_timeout_s``."""
        self.predictor.configure(
            int(config.get("max_batch_size", 8)), float(config.get("batch_wait_timeout_s", 0.0))
        )

    # -- helpers -------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        token = self._token
        if token is None:  # auth: none, chosen in the config
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise ApiError(
                401, "unauthorized", "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"}
            )

    async def _statuses(self) -> dict[str, dict[str, Any]]:
        """Every deployment's status, without waiting on any request queue: the Gateway's own
        store, and the explainers' last reports (kdray.serving.readiness)."""
        self._board.start()
        statuses = {
            "Gateway": await run_in_threadpool(store_status, self.predictor.store),
            **self._board.statuses(),
        }
        merge_cards(self._cards, statuses)
        # Copies: the board keeps the reports themselves.
        return {
            name: {**s, "errors": {k: redact(e, self._uri) for k, e in s["errors"].items()}}
            for name, s in statuses.items()
        }

    async def _card(self, dataset: str, role: str = "student") -> dict[str, Any]:
        """The loaded model's card; 404 for a dataset not served, 503 while it is not loaded."""
        if dataset not in DATASETS:
            raise ApiError(
                404,
                "unknown_dataset",
                f"unknown dataset {dataset!r}; expected one of {sorted(DATASETS)}",
            )
        if self.settings.datasets is not None and dataset not in self.settings.datasets:
            raise ApiError(404, "unknown_dataset", f"dataset {dataset!r} is not served here")
        key = f"{dataset}/{role}"
        if key not in self._cards:
            statuses = await self._statuses()
            if key not in self._cards:
                self._board.poke()  # loaded since the last report? The next one will say
                reasons = [
                    e
                    for s in statuses.values()
                    for k, e in s["errors"].items()
                    if k in (key, "registry") or "/" not in k
                ]
                raise ApiError(
                    503,
                    "model_unavailable",
                    f"{key} is not loaded: {'; '.join(dict.fromkeys(reasons)) or 'loading'}",
                    {"Retry-After": "10"},
                )
        return self._cards[key]

    def _deadline(self, started: float) -> float:
        return max(0.001, self.settings.request_timeout_s - (time.perf_counter() - started))

    async def _gather(self, responses: list[Any], started: float) -> list[Any]:
        """Await predictions and deployment calls within the request's deadline; map errors to HTTP."""
        try:
            return await asyncio.wait_for(asyncio.gather(*responses), self._deadline(started))
        except TimeoutError:
            for response in responses:  # deployment calls: stop the replica's work too
                if isinstance(response, DeploymentResponse):
                    response.cancel()
            raise ApiError(
                504,
                "timeout",
                f"not done within {self.settings.request_timeout_s:g} s (args.request_timeout_s)",
            ) from None
        except ModelUnavailable as exc:
            raise ApiError(503, "model_unavailable", str(exc), {"Retry-After": "10"}) from None
        except BackPressureError:
            raise ApiError(
                503, "busy", "too many requests queued; retry later", {"Retry-After": "1"}
            ) from None
        except ExplainError as exc:
            raise ApiError(422, "cannot_explain", str(exc)) from None

    async def _image(self, request: Request, size: int, timings: Timings) -> Any:
        try:
            upload = await read_upload(request, self.settings.max_body_bytes)
            timings.mark("read")
            image = await run_in_threadpool(
                decode_upload, upload, size, self.settings.max_pixels, self._budget
            )
            timings.mark("decode")
            return image
        except UploadError as exc:
            retry = {"Retry-After": "1"} if exc.status == 503 else None  # the decode budget
            raise ApiError(exc.status, exc.error, exc.detail, retry) from None

    # -- audits (tune/audit.py's runs, read-only) -------------------------------------------------
    async def _audit_call(self, fn: Any, *args: Any) -> Any:
        try:
            return await run_in_threadpool(fn, *args)
        except AuditNotFound as exc:
            raise ApiError(404, "not_found", str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - the tracking store: name it, not its URI
            raise ApiError(
                503, "tracking_unavailable", f"audits: {redact(str(exc), self._uri)[:300]}"
            ) from None

    # -- Open Inference Protocol (KServe v2 REST): kdray.serving.oip ----------------------------
    async def _oip_card(self, request: Request, name: str) -> tuple[str, str, dict]:
        """(dataset, role, card) of a protocol model name, after the request's auth.

        Raises:
            OipError: the protocol's answer (401, 404, 503) with ``{"error": reason}``.
        """
        try:
            self._authorize(request)
            dataset, role = split_model_name(name)
            if role == "teacher" and not self.settings.teacher:
                raise ApiError(404, "unknown_model", "this server does not serve teachers")
            return dataset, role, await self._card(dataset, role)
        except ApiError as exc:
            raise OipError(exc.status, exc.detail) from None

    @staticmethod
    def _oip_error(exc: OipError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        if exc.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return JSONResponse({"error": exc.reason}, status_code=exc.status, headers=headers)
