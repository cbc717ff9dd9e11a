"""The decode budget: pixels being decoded at once, across requests, stay bounded."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from kdray.serving.settings import SERVE_MAX_PIXELS, load_settings
from kdray.serving.uploads import (
    DecodeBudgetExceeded,
    PixelBudget,
    Upload,
    UploadError,
    decode_upload,
)

from conftest import huge_png_header


def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height)).save(out, "PNG")
    return out.getvalue()


def test_the_budget_admits_one_image_alone_and_refuses_what_goes_beyond():
    budget = PixelBudget(1_000)
    with budget.holding() as admit:
        admit(5_000)  # alone: admitted even above the budget (its own limit is max_pixels)
        assert budget.in_flight == 5_000
        with budget.holding() as second, pytest.raises(DecodeBudgetExceeded, match="budget"):
            second(1)
    assert budget.in_flight == 0  # released, also after the refusal
    with budget.holding() as a, budget.holding() as b:
        a(400)
        b(600)  # 1000: within
        assert budget.in_flight == 1_000
    assert budget.in_flight == 0


def test_decoding_past_the_budget_is_a_503_and_the_image_decodes_once_the_budget_frees():
    budget = PixelBudget(1_500_000)
    upload = Upload(_png(1000, 1000), "x.png", "image/png")
    with budget.holding() as other_request:
        other_request(1_000_000)  # another request's image, being decoded
        with pytest.raises(UploadError) as refused:
            decode_upload(upload, 32, SERVE_MAX_PIXELS, budget)
        assert refused.value.status == 503 and refused.value.error == "busy"
    image = decode_upload(upload, 32, SERVE_MAX_PIXELS, budget)
    assert image.shape == (3, 32, 32) and image.dtype == np.uint8
    assert budget.in_flight == 0


def test_the_serving_defaults_fit_the_models_served():
    settings = load_settings({})
    assert settings.max_pixels == SERVE_MAX_PIXELS == 4096 * 4096  # the models take <= 224 px
    assert settings.max_decode_pixels >= settings.max_pixels
    with pytest.raises(UploadError) as too_large:  # 8000 x 8000 declared: 413 from the header
        decode_upload(
            Upload(huge_png_header(8000, 8000), "x.png", "image/png"), 32, SERVE_MAX_PIXELS
        )
    assert too_large.value.status == 413
