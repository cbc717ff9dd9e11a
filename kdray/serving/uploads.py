"""An image from an HTTP request, read within limits and decoded before any model sees it.

Ray Serve's proxy sets no limit on request bodies, so the body is read here in chunks and
refused (413) past ``max_bytes``, also when the client sends no Content-Length. Decoding checks
the image's dimensions in its header before the pixels (:mod:`kdray.data.images`), so a small
file declaring 20000x20000 pixels is a 413, not a memory spike; and the pixels being decoded at
once, across requests, stay within a budget (:class:`PixelBudget`: 503 beyond it).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from kdray.data.images import ImageError, read_image

__all__ = [
    "RAW_TYPES",
    "DecodeBudgetExceeded",
    "PixelBudget",
    "Upload",
    "UploadError",
    "decode_upload",
    "read_body",
    "read_upload",
]

RAW_TYPES = frozenset(
    {
        "image/png",
        "image/jpeg",
        "image/jpg",
        "image/bmp",
        "image/x-ms-bmp",
        "image/tiff",
        "application/dicom",
        "application/octet-stream",
    }
)
_STATUS = {"corrupt": 400, "too_large": 413, "unsupported": 415}


class UploadError(Exception):
    """A request whose image cannot be used: HTTP ``status``, ``error`` code, ``detail``."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


@dataclass
class Upload:
    data: bytes
    filename: str | None
    content_type: str


def _too_large(limit: int) -> UploadError:
    return UploadError(
        413, "payload_too_large", f"request body above the {limit / 2**20:g} MB limit"
    )


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def read_upload(request: Request, limit: int) -> Upload:
    """The image of a request: multipart field ``file``, or the raw body with its content type.

    Raises:
        UploadError: 413 body too large, 415 content type not accepted, 400 no image in it.
    """
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        body = await read_body(request, limit)
        try:
            form = await MultiPartParser(
                request.headers, _once(body), max_files=1, max_fields=16, max_part_size=limit
            ).parse()
        except MultiPartException as exc:
            raise UploadError(
                400, "bad_multipart", f"malformed multipart body: {exc.message}"
            ) from None
        part = form.get("file")
        if not isinstance(part, UploadFile):
            raise UploadError(400, "missing_file", "multipart body has no file field named 'file'")
        data = await part.read()
        part_type = (part.content_type or "application/octet-stream").split(";")[0].strip().lower()
        upload = Upload(data, part.filename, part_type)
    elif content_type in RAW_TYPES:
        upload = Upload(await read_body(request, limit), None, content_type)
    else:
        raise UploadError(
            415,
            "unsupported_media_type",
            f"content type {content_type or '(none)'!r} not accepted; send multipart/form-data "
            f"with a 'file' field, or the image as the body with one of {sorted(RAW_TYPES)}",
        )
    if not upload.data:
        raise UploadError(400, "empty_body", "no image bytes in the request")
    return upload


def decode_upload(
    upload: Upload, size: int, max_pixels: int, budget: PixelBudget | None = None
) -> np.ndarray:
    """The upload as the model's input: uint8 (3, size, size), resized as in training.

    With ``budget``, its pixels count against the replica's budget while they are decoded.

    Raises:
        UploadError: 400 corrupt or not an image, 413 too many pixels, 415 unsupported format
            (e.g. a DICOM transfer syntax without a decoder), 503 the budget is spent; the
            detail names the reason.
    """
    try:
        with budget.holding() if budget is not None else nullcontext(None) as admit:
            return read_image(
                upload.data,
                size,
                filename=upload.filename,
                content_type=upload.content_type,
                max_pixels=max_pixels,
                admit=admit,
            )
    except DecodeBudgetExceeded as exc:
        raise UploadError(503, "busy", f"too many image pixels being decoded: {exc}") from None
    except ImageError as exc:
        error = {
            "corrupt": "bad_image",
            "too_large": "image_too_large",
            "unsupported": "unsupported_image",
        }[exc.kind]
        raise UploadError(_STATUS[exc.kind], error, exc.reason) from None


class DecodeBudgetExceeded(Exception):
    """More decoded pixels in flight than the server's budget: answer 503 and Retry-After."""


class PixelBudget:
    """Bounds the pixels being decoded at once, across all requests of a replica.

    ``max_pixels`` bounds one image; this bounds their sum (a small PNG can declare 8000x8000
    and decode to 192 MB, and the replica decodes on a pool of 40 threads). An image that alone
    fits the per-image limit is always admitted when nothing else is in flight, so the budget
    never refuses a valid image on an idle server.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self._lock = threading.Lock()

    @contextmanager
    def holding(self) -> Iterator[Callable[[int], None]]:
        """An ``admit`` hook for :func:`kdray.data.images.decode`; what it admitted is released
        when the block ends (after the decoded image became the model's small input)."""
        taken: list[int] = []

        def admit(pixels: int) -> None:
            with self._lock:
                if self.in_flight and self.in_flight + pixels > self.limit:
                    raise DecodeBudgetExceeded(
                        f"{self.in_flight / 1e6:.0f} MP being decoded, budget "
                        f"{self.limit / 1e6:.0f} MP (args.max_decode_pixels)"
                    )
                self.in_flight += pixels
                taken.append(pixels)

        try:
            yield admit
        finally:
            with self._lock:
                self.in_flight -= sum(taken)
