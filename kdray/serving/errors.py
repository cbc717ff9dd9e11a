"""The HTTP service's error answers: every answer that is not a success is JSON.

:class:`ApiError` is what the Gateway's routes raise; :func:`add_error_handlers` makes it, and
Starlette's own HTTP errors, invalid requests and anything unexpected, an
:class:`~kdray.serving.schemas.ErrorBody` with its status (a 4xx for bad input, never a 500).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kdray.serving.schemas import ErrorBody

__all__ = ["ApiError", "add_error_handlers"]

log = logging.getLogger("kdray.serve")


class ApiError(Exception):
    """Answered as ``status`` with an :class:`ErrorBody`."""

    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.error, self.detail, self.headers = status, error, detail, headers


def _json_error(
    status: int, error: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        ErrorBody(error=error, detail=detail).model_dump(), status_code=status, headers=headers
    )


async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
    return _json_error(exc.status, exc.error, exc.detail, exc.headers)


async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    error = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return _json_error(exc.status_code, error, str(exc.detail), getattr(exc, "headers", None))


async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
    return _json_error(422, "invalid_request", "; ".join(parts))


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.error("unexpected %s", type(exc).__name__)  # no request data in logs
    return _json_error(
        500, "internal_error", f"unexpected {type(exc).__name__}; see the server log"
    )


def add_error_handlers(app: FastAPI) -> None:
    """Answer every error of ``app`` as an :class:`ErrorBody`."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(Exception, _unexpected)
