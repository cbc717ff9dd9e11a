"""The HTTP front door: a FastAPI ingress that predicts itself and hands explanations on.

``build_app(args)`` is the Ray Serve application builder that ``serve/config.yaml`` imports
(through ``serve/app.py``). Every answer that is not a success is JSON
(:class:`~kdray.serving.schemas.ErrorBody`) with a 4xx for bad input, never a 500.
"""

# No `from __future__ import annotations` here: Serve's class-based views re-create the route
# functions, and FastAPI would resolve string annotations (`Request`) in Serve's module instead.
# The routes stay in this module, on Gateway itself: Serve sends the class to its replicas by
# value, and a route inherited from a class of another module would reach them without the
# signature Serve gives it here (its `self` an unknown query parameter).
import pathlib
import time
from typing import Any, Literal

from fastapi import FastAPI, Path, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from ray import serve
from starlette.concurrency import run_in_threadpool

from kdray import __version__
from kdray.data.specs import DATASETS
from kdray.explain.api import METHODS
from kdray.serving.deployments import Explainer
from kdray.serving.errors import ApiError, add_error_handlers
from kdray.serving.gateway import GatewayCore
from kdray.serving.oip import (
    OipError,
    infer_response,
    model_metadata,
    parse_infer,
)
from kdray.serving.schemas import (
    ErrorBody,
    ExplainResponse,
    ModelCard,
    ModelsResponse,
    ModelVersion,
    PredictResponse,
    ReadyBody,
)
from kdray.serving.settings import load_settings
from kdray.serving.timings import Timings
from kdray.serving.uploads import RAW_TYPES, UploadError, read_body

__all__ = ["Gateway", "app", "build_app"]

STATIC = pathlib.Path(__file__).resolve().parent / "static"


app = FastAPI(
    title="kdray",
    version=__version__,
    description="Transparent medical image classifiers: the distilled student predicts; feature "
    "maps, Grad-CAM and SHAP explain it, beside its DenseNet121 teacher. Images: multipart "
    "field `file`, or the raw body with its content type (PNG, JPEG, BMP, TIFF, DICOM).",
)
app.mount("/static", StaticFiles(directory=STATIC), name="static")
add_error_handlers(app)


_ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 404, 413, 415, 422, 503, 504)}
# The served datasets, as the schema's enum (clients and fuzzers see them); any other name is a 404.
DatasetPath = Path(description="dataset id", json_schema_extra={"enum": sorted(DATASETS)})
_IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            },
            **{t: {"schema": {"type": "string", "format": "binary"}} for t in sorted(RAW_TYPES)},
        },
    }
}


@serve.deployment(name="Gateway", max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
@serve.ingress(app)
class Gateway(GatewayCore):
    """Routes, limits, auth, decoding and batched prediction (the students live here, in
    :class:`~kdray.serving.gateway.GatewayCore`); the explanations go to the Explainer and
    ShapExplainer deployments it holds handles to."""

    # -- routes --------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def viewer(self) -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/healthz", summary="Alive")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        response_model=ReadyBody,
        summary="Every configured model loaded",
        responses={503: {"model": ReadyBody}},
    )
    async def readyz(self) -> JSONResponse:
        statuses = await self._statuses()
        body = ReadyBody(
            ready=all(s["ready"] for s in statuses.values()),
            models=sorted({m for s in statuses.values() for m in s["loaded"]}),
            errors={f"{n}: {k}": e for n, s in statuses.items() for k, e in s["errors"].items()},
            swaps={
                f"{n}: {k}": e for n, s in statuses.items() for k, e in s.get("swaps", {}).items()
            },
        )
        return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)

    @app.get(
        "/v1/models",
        response_model=ModelsResponse,
        responses=_ERRORS,
        summary="Served models: classes, registry versions, test metrics, size, methods",
    )
    async def models(self, request: Request) -> ModelsResponse:
        self._authorize(request)
        await self._statuses()
        cards = []
        for key in sorted(k for k in self._cards if k.endswith("/student")):
            dataset = key.split("/")[0]
            student, teacher = self._cards[key], self._cards.get(f"{dataset}/teacher")
            cards.append(
                ModelCard(
                    dataset=dataset,
                    title=student["title"],
                    classes=student["classes"],
                    image_size=student["image_size"],
                    student=student["entry"],
                    teacher=teacher["entry"] if teacher else None,
                )
            )
        return ModelsResponse(models=cards)

    @app.get(
        "/v1/audits", responses=_ERRORS, summary="Dataset audits (tune/audit.py), newest first"
    )
    async def audits(self, request: Request, dataset: str | None = None) -> dict[str, Any]:
        self._authorize(request)
        if dataset is not None and dataset not in DATASETS:
            raise ApiError(
                404, "unknown_dataset", f"dataset {dataset!r}: expected one of {sorted(DATASETS)}"
            )
        return {"audits": await self._audit_call(self._audits.list, dataset)}

    @app.get(
        "/v1/audits/{run_id}",
        responses=_ERRORS,
        summary="One audit: its look-first lists, aggregates and models",
    )
    async def audit(self, request: Request, run_id: str) -> dict[str, Any]:
        self._authorize(request)
        return await self._audit_call(self._audits.summary, run_id)

    @app.get(
        "/v1/audits/{run_id}/rows/{index}",
        responses=_ERRORS,
        summary="One audited image: labels, probabilities, scores and its maps as PNG layers",
    )
    async def audit_row(
        self, request: Request, run_id: str, index: int = Path(ge=0)
    ) -> dict[str, Any]:
        self._authorize(request)
        return await self._audit_call(self._audits.row, run_id, index)

    @app.post(
        "/v1/models/{dataset}/predict",
        response_model=PredictResponse,
        responses=_ERRORS,
        openapi_extra=_IMAGE_BODY,
        summary="Classify one image with the student",
    )
    async def predict(
        self, request: Request, response: Response, dataset: str = DatasetPath
    ) -> PredictResponse:
        timings = Timings()
        self._authorize(request)
        card = await self._card(dataset)
        image = await self._image(request, card["image_size"], timings)
        (probs,) = await self._gather([self.predictor.predict(dataset, image)], timings.started)
        timings.mark("model")
        best = max(range(len(probs)), key=probs.__getitem__)
        response.headers["Server-Timing"] = timings.header()
        return PredictResponse(
            dataset=dataset,
            label=card["classes"][best],
            class_index=best,
            probabilities=dict(zip(card["classes"], probs, strict=True)),
            model=ModelVersion(**card["entry"]["registry"]),
            server_ms=timings.total_ms,
        )

    @app.post(
        "/v1/models/{dataset}/explain",
        response_model=ExplainResponse,
        responses=_ERRORS,
        response_model_exclude_none=True,
        openapi_extra=_IMAGE_BODY,
        summary="Predict and explain one image: feature maps, the class activation map (HiResCAM, "
        "Grad-CAM, ...), SHAP; student, teacher or both",
    )
    async def explain(
        self,
        request: Request,
        response: Response,
        dataset: str = DatasetPath,
        methods: str = Query(
            "feature_maps,gradcam", description=f"comma-separated, any of {', '.join(METHODS)}"
        ),
        model: Literal["student", "teacher", "both"] = Query(
            "student", description="both: the paper's comparison"
        ),
        include_arrays: bool = Query(False, description="add the raw maps as nested lists"),
        render: Literal["overlay", "layer", "both", "none"] = Query(
            "overlay",
            description="per map: overlay (png: blended over the input), layer "
            "(heat_png: the map alone, to draw over input_png at any opacity), both, or none "
            "(no image drawn or encoded: with include_arrays, the raw maps alone)",
        ),
        nsamples: int | None = Query(
            None, ge=1, description="SHAP samples (default and upper bound: server args)"
        ),
        target: int | None = Query(
            None, ge=0, description="class index to explain (default: the prediction)"
        ),
        cam: Literal["hirescam", "gradcam", "layercam", "gradcampp", "xgradcam"] | None = Query(
            None,
            description="the class activation map's variant (method gradcam): hirescam, gradcam "
            "(the paper's Grad-CAM), layercam, gradcampp, xgradcam; default: the model's own "
            "(its card's cam.method), at the model's own layer",
        ),
    ) -> ExplainResponse:
        timings = Timings()
        self._authorize(request)
        wanted = [m.strip() for m in methods.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in METHODS]
        if unknown or not wanted:
            raise ApiError(
                422,
                "invalid_method",
                f"unknown method(s) {unknown or [methods]}; expected any of {list(METHODS)}",
            )
        n = nsamples or self.settings.shap_nsamples
        if n > self.settings.max_shap_nsamples:
            raise ApiError(
                422,
                "invalid_request",
                f"nsamples {n} above the server's limit {self.settings.max_shap_nsamples}",
            )
        if model != "student" and not self.settings.teacher:
            raise ApiError(
                422, "invalid_model", "this server does not serve teachers (args.teacher: false)"
            )
        roles = ["student", "teacher"] if model == "both" else [model]
        cards = {role: await self._card(dataset, role) for role in roles}
        for role, card in cards.items():
            missing = [m for m in wanted if m not in card["entry"]["methods"]]
            if missing:
                raise ApiError(
                    422,
                    "invalid_method",
                    f"{missing} not available for the {role} (no SHAP background registered)",
                )
            if target is not None and target >= len(card["classes"]):
                raise ApiError(
                    422,
                    "invalid_request",
                    f"target {target} beyond the {len(card['classes'])} classes",
                )
        image = await self._image(request, cards[roles[0]]["image_size"], timings)
        fast, slow = [m for m in wanted if m != "shap"], [m for m in wanted if m == "shap"]
        calls, owners = [], []
        for role in roles:
            for handle, part in ((self.explainer, fast), (self.shap, slow)):
                if part:
                    calls.append(
                        handle.explain.remote(
                            dataset, role, image, part, n, include_arrays, target, render, cam
                        )
                    )
                    owners.append(role)
        results = await self._gather(calls, timings.started)
        timings.mark("explain")
        merged: dict[str, Any] = {}
        for role, result in zip(owners, results, strict=True):
            if role in merged:  # the SHAP part of this model's explanation ran beside the rest
                merged[role].methods.update(result.methods)
                merged[role].total_ms = max(merged[role].total_ms, result.total_ms)
            else:
                merged[role] = result
        label_from = merged["teacher" if model == "teacher" else "student"]
        response.headers["Server-Timing"] = timings.header()
        return ExplainResponse(
            dataset=dataset,
            label=label_from.class_name or str(label_from.prediction),
            explanations=merged,
            models={role: ModelVersion(**cards[role]["entry"]["registry"]) for role in roles},
            agreement=(merged["student"].prediction == merged["teacher"].prediction)
            if model == "both"
            else None,
            server_ms=timings.total_ms,
        )

    @app.get("/v2", summary="Open Inference Protocol: server metadata")
    async def v2_server(self) -> dict[str, Any]:
        return {"name": "kdray", "version": __version__, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live", summary="Open Inference Protocol: alive")
    async def v2_live(self) -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready", summary="Open Inference Protocol: every model loaded")
    async def v2_ready(self) -> JSONResponse:
        ready = all(s["ready"] for s in (await self._statuses()).values())
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.get("/v2/models/{name}", summary="Open Inference Protocol: model metadata")
    async def v2_model(self, request: Request, name: str) -> JSONResponse:
        try:
            _, _, card = await self._oip_card(request, name)
        except OipError as exc:
            return self._oip_error(exc)
        version = card["entry"]["registry"]["version"]
        return JSONResponse(model_metadata(name, version, card["classes"], card["image_size"]))

    @app.get("/v2/models/{name}/ready", summary="Open Inference Protocol: model loaded")
    async def v2_model_ready(self, request: Request, name: str) -> JSONResponse:
        try:
            await self._oip_card(request, name)
        except OipError as exc:
            if exc.status == 503:
                return JSONResponse({"name": name, "ready": False}, status_code=503)
            return self._oip_error(exc)
        return JSONResponse({"name": name, "ready": True})

    @app.post("/v2/models/{name}/infer", summary="Open Inference Protocol: inference")
    async def v2_infer(self, request: Request, name: str) -> JSONResponse:
        started = time.perf_counter()
        try:
            dataset, role, card = await self._oip_card(request, name)
            try:
                body = await read_body(request, self.settings.max_body_bytes)
            except UploadError as exc:
                raise OipError(exc.status, exc.detail) from None
            parsed = await run_in_threadpool(
                parse_infer,
                body,
                request.headers.get("inference-header-content-length"),
                card["image_size"],
                self.settings.max_infer_batch,
                self.settings.max_pixels,
                self._budget,
            )
            if role == "student":  # batched with /predict's requests, in this replica
                calls = [self.predictor.predict(dataset, image) for image in parsed.images]
                probs = await self._gather(calls, started)
            else:
                (probs,) = await self._gather(
                    [self.explainer.predict.remote(dataset, role, parsed.images)], started
                )
        except OipError as exc:
            return self._oip_error(exc)
        except ApiError as exc:  # from the model calls: busy, timeout, not loaded
            return self._oip_error(OipError(exc.status, exc.detail))
        version = card["entry"]["registry"]["version"]
        return JSONResponse(infer_response(name, version, parsed, probs, card["classes"]))


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The Ray Serve application (``import_path: serve.app:build_app`` in ``serve/config.yaml``).

    Args:
        args: :class:`~kdray.serving.settings.ServeSettings` fields (the config's ``args``).

    Raises:
        ConfigError: a bad or unknown key, named.
    """
    settings = load_settings(args)
    # Resolved once here, so every replica reads the same registry whatever its working dir.
    resolved = settings.model_dump() | {"tracking_uri": settings.resolved_tracking_uri()}
    shap = Explainer.options(
        name="ShapExplainer",
        max_ongoing_requests=2,
        max_queued_requests=64,
        ray_actor_options={"num_cpus": 0},
    )
    return Gateway.bind(Explainer.bind(resolved), shap.bind(resolved), resolved)
