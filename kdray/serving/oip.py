"""The Open Inference Protocol (KServe v2 REST), as Triton, KServe and Seldon clients speak it.

Each champion is a model named ``<dataset>`` and its teacher ``<dataset>-teacher``. Input: one
tensor, either UINT8 images ``[N, H, W, 3]`` or ``[N, 3, H, W]`` (resized to the model's input
as uploads are), or BYTES holding encoded images (PNG, JPEG, DICOM...: kdray's own decoder).
Outputs: ``probabilities`` (FP32 ``[N, classes]``) and ``label`` (BYTES ``[N]``). Tensors travel
as JSON (BYTES elements as base64 strings) or with the binary tensor extension (``Inference-Header-Content-Length``: a JSON header,
then each binary tensor's bytes), which ``tritonclient.http`` uses by default; answers are JSON.
Errors are ``{"error": "<reason>"}`` with a 4xx, as the protocol says.
"""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from kdray.data.images import to_model_input
from kdray.serving.uploads import PixelBudget, Upload, UploadError, decode_upload

__all__ = [
    "INPUT",
    "OUTPUTS",
    "InferRequest",
    "OipError",
    "infer_response",
    "model_metadata",
    "parse_infer",
    "split_model_name",
]

INPUT = "image"
OUTPUTS = ("probabilities", "label")
TEACHER_SUFFIX = "-teacher"


class OipError(Exception):
    """A request the protocol answers with ``status`` and ``{"error": reason}``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass
class InferRequest:
    id: str | None
    images: list[np.ndarray]  # uint8 (3, S, S), the model's input
    outputs: list[str]


def split_model_name(name: str) -> tuple[str, str]:
    """``brain_tumor`` -> (brain_tumor, student); ``brain_tumor-teacher`` -> (brain_tumor, teacher)."""
    if name.endswith(TEACHER_SUFFIX):
        return name[: -len(TEACHER_SUFFIX)], "teacher"
    return name, "student"


def model_metadata(name: str, version: str, classes: list[str], size: int) -> dict[str, Any]:
    """``GET /v2/models/{name}``: inputs and outputs with datatypes and shapes (-1: any)."""
    return {
        "name": name,
        "versions": [version],
        "platform": "pytorch",
        "inputs": [
            {"name": INPUT, "datatype": "UINT8", "shape": [-1, -1, -1, 3]},
        ],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(classes)]},
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
        ],
        "parameters": {
            "classes": classes,
            "image_size": size,
            "input_layouts": ["UINT8 [N, H, W, 3]", "UINT8 [N, 3, H, W]", "BYTES [N] encoded"],
        },
    }


def _bytes_elements(raw: bytes, count: int) -> list[bytes]:
    """The binary extension's BYTES layout: each element a 4-byte little-endian length + bytes."""
    out, at = [], 0
    for _ in range(count):
        if at + 4 > len(raw):
            raise OipError(400, "BYTES tensor data shorter than its shape says")
        (length,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + length > len(raw):
            raise OipError(400, "BYTES element longer than the tensor data")
        out.append(raw[at : at + length])
        at += length
    if at != len(raw):
        raise OipError(400, "BYTES tensor data longer than its shape says")
    return out


def parse_infer(
    body: bytes,
    header_length: str | None,
    size: int,
    max_batch: int,
    max_pixels: int,
    budget: PixelBudget | None = None,
) -> InferRequest:
    """``POST /v2/models/{name}/infer``'s body -> the model's inputs.

    Raises:
        OipError: 400 for anything malformed (JSON, names, datatype, shape, element count,
            undecodable images), 413 for more images or pixels than the limits allow.
    """
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise OipError(400, "Inference-Header-Content-Length is not a number") from None
        if not 0 < n <= len(body):
            raise OipError(400, "Inference-Header-Content-Length outside the body")
        header, binary = body[:n], body[n:]
    else:
        header, binary = body, b""
    try:
        request = json.loads(header)
    except (ValueError, UnicodeDecodeError):
        raise OipError(400, "the request is not JSON") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise OipError(400, "the request needs an 'inputs' list")
    inputs = request["inputs"]
    if len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise OipError(400, f"expected exactly one input tensor ({INPUT!r})")
    tensor = inputs[0]
    datatype, shape = tensor.get("datatype"), tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise OipError(400, "input 'shape' must be a list of non-negative integers")
    if not shape or shape[0] < 1:
        raise OipError(400, "input shape must start with a batch size of at least 1")
    if shape[0] > max_batch:
        raise OipError(413, f"batch of {shape[0]} images, above the limit of {max_batch}")
    params = tensor.get("parameters") or {}
    size_binary = params.get("binary_data_size") if isinstance(params, dict) else None
    count = int(np.prod(shape))
    if datatype == "BYTES":
        if len(shape) != 1:
            raise OipError(400, f"BYTES input must have shape [N], got {shape}")
        if size_binary is not None:
            if size_binary != len(binary):
                raise OipError(400, "binary_data_size does not match the binary data")
            encoded = _bytes_elements(binary, count)
        else:  # JSON has no bytes: each element an encoded image in base64
            data = tensor.get("data")
            if not isinstance(data, list) or len(data) != count:
                raise OipError(400, f"input 'data' must hold {count} elements")
            try:
                encoded = [base64.b64decode(d, validate=True) for d in data]
            except (ValueError, TypeError):
                raise OipError(400, "BYTES data in JSON must be base64 strings") from None
        images = []
        for i, blob in enumerate(encoded):
            try:  # the uploads' decoder, limits and decode budget
                images.append(decode_upload(Upload(blob, None, None), size, max_pixels, budget))
            except UploadError as exc:
                if exc.status == 503:  # the budget: no element is at fault
                    raise OipError(503, exc.detail) from None
                raise OipError(
                    413 if exc.status == 413 else 400, f"element {i}: {exc.detail}"
                ) from None
    elif datatype == "UINT8":
        if len(shape) != 4 or not (shape[3] == 3 or shape[1] == 3):
            raise OipError(400, f"UINT8 input must be [N, H, W, 3] or [N, 3, H, W], got {shape}")
        channels_last = shape[3] == 3
        height, width = (shape[1], shape[2]) if channels_last else (shape[2], shape[3])
        if height < 1 or width < 1:
            raise OipError(400, f"images must be at least 1x1 pixels, got shape {shape}")
        if height * width > max_pixels:
            raise OipError(413, f"images of {width}x{height} pixels, above the limit")
        if size_binary is not None:
            if size_binary != len(binary) or len(binary) != count:
                raise OipError(400, f"binary data of {len(binary)} bytes for {count} elements")
            array = np.frombuffer(binary, dtype=np.uint8)
        else:
            data = tensor.get("data")
            if not isinstance(data, list):
                raise OipError(400, "input 'data' must be a list")
            try:
                array = np.asarray(data, dtype=np.int64).reshape(-1)
            except (ValueError, TypeError):
                raise OipError(400, "input 'data' must be a flat list of integers") from None
            if array.size != count:
                raise OipError(400, f"input 'data' holds {array.size} elements, shape says {count}")
            if array.size and (array.min() < 0 or array.max() > 255):
                raise OipError(400, "UINT8 values must be within 0-255")
            array = array.astype(np.uint8)
        array = array.reshape(shape)
        if not channels_last:
            array = array.transpose(0, 2, 3, 1)
        # bilinear as every upload is
        images = [to_model_input(Image.fromarray(np.ascontiguousarray(a)), size) for a in array]
    else:
        raise OipError(400, f"input datatype must be UINT8 or BYTES, got {datatype!r}")
    wanted = request.get("outputs")
    names = list(OUTPUTS)
    if wanted is not None:
        if not isinstance(wanted, list) or not all(isinstance(o, dict) for o in wanted):
            raise OipError(400, "'outputs' must be a list of objects")
        names = [o.get("name") for o in wanted]
        unknown = [n for n in names if n not in OUTPUTS]
        if unknown:
            raise OipError(400, f"unknown output(s) {unknown}; this model has {list(OUTPUTS)}")
    rid = request.get("id")
    return InferRequest(str(rid) if rid is not None else None, images, names)


def infer_response(
    name: str, version: str, request: InferRequest, probs: list[list[float]], classes: list[str]
) -> dict[str, Any]:
    """The protocol's JSON answer, with the outputs the request named."""
    out: dict[str, Any] = {"model_name": name, "model_version": version, "outputs": []}
    if request.id is not None:
        out["id"] = request.id
    n = len(probs)
    for output in request.outputs:
        if output == "probabilities":
            flat = [float(p) for row in probs for p in row]
            out["outputs"].append(
                {"name": output, "datatype": "FP32", "shape": [n, len(classes)], "data": flat}
            )
        else:
            labels = [classes[int(np.argmax(row))] for row in probs]
            out["outputs"].append(
                {"name": output, "datatype": "BYTES", "shape": [n], "data": labels}
            )
    return out
