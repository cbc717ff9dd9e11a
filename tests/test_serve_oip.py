"""The Open Inference Protocol's request parsing (unit tests; the live service is tested with
tritonclient in test_serve.py)."""

from __future__ import annotations

import base64
import io
import json
import struct

import numpy as np
import pytest
from PIL import Image

from kdray.serving.oip import (
    InferRequest,
    OipError,
    infer_response,
    parse_infer,
    split_model_name,
)


def _req(tensor: dict, **extra) -> bytes:
    return json.dumps({"inputs": [tensor], **extra}).encode()


def _png(color=(10, 200, 30), size=(40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "PNG")
    return out.getvalue()


def _uint8(array: np.ndarray) -> InferRequest:
    """A JSON UINT8 request of ``array`` (its own shape), parsed for a 16 px model."""
    tensor = {
        "name": "image",
        "datatype": "UINT8",
        "shape": list(array.shape),
        "data": array.ravel().tolist(),
    }
    return parse_infer(_req(tensor), None, 16, 64, 10_000)


def test_uint8_images_in_either_layout_become_the_models_input():
    nhwc = np.zeros((2, 8, 6, 3), dtype=np.uint8)
    nhwc[..., 0] = 255  # red
    a, b = _uint8(nhwc), _uint8(nhwc.transpose(0, 3, 1, 2))
    assert len(a.images) == 2 and a.images[0].shape == (3, 16, 16)
    assert (a.images[0][0] == 255).all() and (a.images[0][1:] == 0).all()
    np.testing.assert_array_equal(a.images[1], b.images[1])


def test_binary_tensors_and_encoded_images():
    png = _png()
    raw = struct.pack("<I", len(png)) + png
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    req = parse_infer(header + raw, str(len(header)), 16, 64, 10_000)
    assert req.images[0].shape == (3, 16, 16) and req.images[0][1].mean() > 150  # green
    in_json = parse_infer(
        _req(
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [1],
                "data": [base64.b64encode(png).decode()],
            }
        ),
        None,
        16,
        64,
        10_000,
    )
    np.testing.assert_array_equal(in_json.images[0], req.images[0])


@pytest.mark.parametrize(
    "body, status, words",
    [
        (b"not json", 400, "not JSON"),
        (json.dumps({"inputs": []}).encode(), 400, "exactly one input"),
        (
            _req({"name": "image", "datatype": "FP32", "shape": [1, 2, 2, 3], "data": [0] * 12}),
            400,
            "UINT8 or BYTES",
        ),
        (
            _req({"name": "image", "datatype": "UINT8", "shape": [1, 2, 2, 3], "data": [0] * 11}),
            400,
            "holds 11 elements",
        ),
        (
            _req({"name": "image", "datatype": "UINT8", "shape": [1, 2, 2, 4], "data": [0] * 16}),
            400,
            "[N, H, W, 3]",
        ),
        (
            _req({"name": "image", "datatype": "UINT8", "shape": [1, 2, 2, 3], "data": [300] * 12}),
            400,
            "0-255",
        ),
        (
            _req({"name": "image", "datatype": "UINT8", "shape": [65, 1, 1, 3], "data": [0] * 195}),
            413,
            "batch of 65",
        ),
        (
            _req({"name": "image", "datatype": "UINT8", "shape": [1, 200, 200, 3], "data": []}),
            413,
            "above the limit",
        ),
        (
            _req({"name": "image", "datatype": "UINT8", "shape": [1, 0, 0, 3], "data": []}),
            400,
            "at least 1x1",
        ),
        (
            _req({"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}),
            400,
            "base64",
        ),
        (
            _req(
                {
                    "name": "image",
                    "datatype": "BYTES",
                    "shape": [1],
                    "data": [base64.b64encode(b"nope").decode()],
                }
            ),
            400,
            "element 0",
        ),
        (
            _req(
                {"name": "image", "datatype": "UINT8", "shape": [1, 1, 1, 3], "data": [0] * 3},
                outputs=[{"name": "x"}],
            ),
            400,
            "unknown output",
        ),
    ],
)
def test_malformed_requests_are_4xx_with_a_reason(body, status, words):
    with pytest.raises(OipError) as refused:
        parse_infer(body, None, 16, 64, 10_000)
    assert refused.value.status == status and words in refused.value.reason


def test_names_and_the_answer():
    assert split_model_name("brain_tumor") == ("brain_tumor", "student")
    assert split_model_name("brain_tumor-teacher") == ("brain_tumor", "teacher")
    req = parse_infer(
        _req(
            {"name": "image", "datatype": "UINT8", "shape": [1, 1, 1, 3], "data": [0, 0, 0]},
            id="42",
        ),
        None,
        4,
        64,
        10_000,
    )
    out = infer_response("brain_tumor", "3", req, [[0.1, 0.7, 0.1, 0.1]], ["a", "b", "c", "d"])
    assert out["id"] == "42" and out["model_version"] == "3"
    probs, label = out["outputs"]
    assert probs["shape"] == [1, 4] and probs["datatype"] == "FP32"
    assert label == {"name": "label", "datatype": "BYTES", "shape": [1], "data": ["b"]}
