"""One JSON error shape (``proponent.api.schemas.ErrorBody``) for every failure the API reports."""

from __future__ import annotations

import contextvars
import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from proponent.api.schemas import ErrorBody

log = logging.getLogger("proponent.service")

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    500: "internal_error",
    503: "unavailable",
    504: "timeout",
}


class BodyTooLarge(StarletteHTTPException):
    """Raised while the body streams in (an HTTPException, so FastAPI's body parsing re-raises it as is)."""

    def __init__(self, limit: int):
        # the rest of the body is never read: the connection cannot be reused
        super().__init__(413, f"request body larger than the limit of {limit} bytes", headers={"Connection": "close"})


class ApiError(Exception):
    """Raise anywhere in a request to answer ``status`` with the error body."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or _CODES.get(status, "error")
        self.headers = headers or {}


def error_response(
    status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    rid = request_id_var.get()
    body = {
        "error": {"status": status, "code": code or _CODES.get(status, "error"), "message": message, "request_id": rid}
    }
    h = dict(headers or {})
    if rid:
        h["X-Request-ID"] = rid
    return JSONResponse(body, status_code=status, headers=h)


def value_text(v: Any) -> str:
    """A request value as the client wrote it (JSON), shortened; never a Python repr."""
    try:
        text = json.dumps(v, allow_nan=True, ensure_ascii=False)
    except (TypeError, ValueError):
        text = type(v).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def validation_message(exc: RequestValidationError | ValidationError) -> str:
    """``field: problem, got VALUE`` for each error (the field's name and the value sent)."""
    parts = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path")) or "params"
        got = f", got {value_text(e['input'])}" if "input" in e and not isinstance(e["input"], dict) else ""
        parts.append(f"{loc}: {e.get('msg', 'invalid')}{got}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.code, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and msg == "Not Found":
            msg = f"no route {request.method} {request.url.path}"
        if exc.status_code == 400 and msg == "There was an error parsing the body":
            # FastAPI's answer to a body that is not UTF-8 / not parseable; malformed JSON is a 422 elsewhere
            return error_response(422, "body is not valid JSON (or not UTF-8 text)")
        return error_response(exc.status_code, msg, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, validation_message(exc))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error ({type(exc).__name__}); see the server log")


#: ``responses=`` for route decorators: documents the error shape in OpenAPI.
def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorBody, "description": _CODES.get(s, "error").replace("_", " ")} for s in statuses}
