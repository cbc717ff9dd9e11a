"""Request and response bodies of the HTTP API (they make ``/openapi.json``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from kdray.explain.api import Explanation

__all__ = [
    "ErrorBody",
    "ExplainResponse",
    "ModelCard",
    "ModelEntry",
    "ModelVersion",
    "ModelsResponse",
    "PredictResponse",
    "ReadyBody",
]


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer: a machine-readable ``error`` and a sentence for people."""

    error: str = Field(description="e.g. payload_too_large, unsupported_media_type, bad_image")
    detail: str


class ModelVersion(BaseModel):
    name: str = Field(description="registered model name, e.g. kdray-brain_tumor")
    alias: str
    version: str
    run_id: str


class ModelEntry(BaseModel):
    registry: ModelVersion
    architecture: str = Field(description="student widths, or densenet121")
    params: int
    flops: int = Field(description="FLOPs of one forward pass at image_size")
    test_metrics: dict[str, float] = Field(
        description="test_accuracy, test_f1_macro, ... of the run"
    )
    methods: list[str] = Field(description="explanation methods available for this model")
    trained_on: str = Field(
        "",
        description="the data this model trained on, from its own data record (a real folder "
        "by its name, never a server path)",
    )
    data: dict[str, Any] = Field(
        default_factory=dict,
        description="the model's data record (kdray.data.record, public form): dataset, "
        "classes, image_size, channel handling, source (the synthetic stand-in's generator "
        "parameters, or a real folder's name), split seed and fractions, split digest, counts; "
        "empty for a version registered before records",
    )
    runtime: str = Field(
        "torch",
        description="what computes this model's predictions (onnx or torch) and why; "
        "the student's feature maps and CAM of its prediction come from its ONNX explain "
        "graph when its export matched torch at load; SHAP and the teachers run on torch",
    )
    update: str = Field(
        "",
        description="this replica's last swap of the model to a new registry version, or why a "
        "new version was refused (the version above still serving)",
    )
    cam: dict[str, Any] = Field(
        default_factory=dict,
        description="the model's class activation map: method (the variant: hirescam, "
        "gradcam, layercam, gradcampp, xgradcam), layer, measured (chosen on its validation "
        "images when it was trained), computed_by (the ONNX explain graph, exact, or torch), "
        "other_variants (what computes a variant asked for with ?cam=)",
    )


class ModelCard(BaseModel):
    dataset: str
    title: str = Field(description="the task, and the data the student trained on")
    classes: list[str]
    image_size: int = Field(description="side of the square model input; uploads are resized to it")
    student: ModelEntry
    teacher: ModelEntry | None = None


class ModelsResponse(BaseModel):
    models: list[ModelCard]


class PredictResponse(BaseModel):
    dataset: str
    label: str
    class_index: int
    probabilities: dict[str, float]
    model: ModelVersion
    server_ms: float = Field(description="time from request received to response ready")


class ExplainResponse(BaseModel):
    dataset: str
    label: str = Field(description="the student's prediction (the teacher's with model=teacher)")
    explanations: dict[Literal["student", "teacher"], Explanation]
    models: dict[Literal["student", "teacher"], ModelVersion]
    agreement: bool | None = Field(
        None, description="model=both: do teacher and student predict the same class"
    )
    server_ms: float


class ReadyBody(BaseModel):
    ready: bool
    models: list[str] = Field(description="loaded models, as <dataset>/<role>")
    errors: dict[str, str] = Field(description="models not loaded, with the reason")
    swaps: dict[str, str] = Field(
        default_factory=dict,
        description="per replica and model: its last swap to a new registry version, or why a "
        "new version was not swapped in (the old one still serving; not a readiness failure)",
    )
