"""Typed client errors: every non-2xx answer becomes an :class:`APIError` subclass."""

from __future__ import annotations

import json
from typing import Any

__all__ = [
    "APIError",
    "BadRequest",
    "Conflict",
    "ConnectionFailed",
    "NotFound",
    "Overloaded",
    "PayloadTooLarge",
    "ProponentError",
    "ServerError",
    "Unauthorized",
    "UnsupportedMediaType",
    "ValidationError",
    "error_from_response",
]


class ProponentError(Exception):
    """Base of every error the client raises."""


class ConnectionFailed(ProponentError):
    """The server could not be reached (after retries)."""


class APIError(ProponentError):
    def __init__(self, status: int, code: str, message: str, request_id: str | None = None):
        super().__init__(f"{status} {code}: {message}" + (f" (request {request_id})" if request_id else ""))
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id


class BadRequest(APIError):
    pass


class Unauthorized(APIError):
    pass


class NotFound(APIError):
    pass


class Conflict(APIError):
    pass


class PayloadTooLarge(APIError):
    pass


class UnsupportedMediaType(APIError):
    pass


class ValidationError(APIError):
    pass


class ServerError(APIError):
    pass


class Overloaded(ServerError):
    """503: the server's queue is full or it is not ready; ``retry_after`` seconds (or None)."""

    def __init__(self, *args: Any, retry_after: float | None = None):
        super().__init__(*args)
        self.retry_after = retry_after


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequest,
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: ValidationError,
    503: Overloaded,
}


def error_from_response(status: int, body: bytes, headers: Any) -> APIError:
    """Build the typed error from an error response (the server's ErrorBody, or anything else)."""
    code, message, request_id = "error", "", headers.get("x-request-id")
    try:
        err = json.loads(body)["error"]
        code, message = str(err.get("code", code)), str(err.get("message", ""))
        request_id = err.get("request_id") or request_id
    except Exception:
        message = body[:500].decode("utf-8", "replace") or f"HTTP {status}"
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else APIError)
    if cls is Overloaded:
        ra = headers.get("retry-after")
        try:
            retry_after = float(ra) if ra is not None else None
        except ValueError:
            retry_after = None
        return Overloaded(status, code, message, request_id, retry_after=retry_after)
    return cls(status, code, message, request_id)
