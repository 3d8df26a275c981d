"""Errors to HTTP, in one place: the status code comes from the exception class.

Every error response has the same body, ``{"error": {"type": ..., "message": ...}}``,
where ``type`` is the class name in :mod:`emberbox.errors` (or ``ValidationError`` for a
request that does not match its schema), so the SDK can raise the same class again.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from emberbox import errors
from emberbox.models import ErrorBody, ErrorDetail
from emberbox.service import metrics

log = logging.getLogger(__name__)

VALIDATION_ERROR = "ValidationError"

_DESCRIPTIONS = {
    400: "Invalid request (InvalidRequest, ImageNotFound, AgentRequestFailed)",
    401: "Missing or wrong API key",
    403: "A configured limit would be passed (QuotaExceeded: `quota` names it)",
    404: "No such sandbox, snapshot, process or guest path (NotFound)",
    409: "The sandbox or snapshot is in a state that forbids the call (Conflict, SnapshotMismatch)",
    413: "The upload is larger than the server's max_upload_bytes (PayloadTooLarge)",
    422: "The request does not match its schema (ValidationError)",
    429: "Too many requests from this key (RateLimited); see the Retry-After header",
    500: "Internal error",
    502: "The VMM or the guest agent failed (VMMError, SnapshotCorrupt, AgentError)",
    503: (
        "The host lacks something (HostError); in a cluster, every host is full "
        "(NoCapacity, see Retry-After) or the sandbox's host does not answer (HostDown)"
    ),
    504: "The command ran past its timeout (ExecTimeout)",
    507: "The server's data dir is full (StorageFull); retry once space is freed",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route: each listed status documented with ErrorBody."""
    return {code: {"model": ErrorBody, "description": _DESCRIPTIONS[code]} for code in codes}


def error_response(status_code: int, type_name: str, message: str, **extra: Any) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(type=type_name, message=message, **extra))
    return JSONResponse(status_code=status_code, content=body.model_dump(exclude_none=True))


def format_validation_errors(items: Sequence[Any]) -> str:
    """``"vcpus: Input should be greater than or equal to 1; ..."``, naming each field."""
    parts = []
    for item in items:
        loc = [str(p) for p in item.get("loc", ())]
        if loc and loc[0] == "body":
            loc = loc[1:]
        where = ".".join(loc) or "body"
        msg = str(item.get("msg", "invalid"))
        if item.get("type") == "json_invalid":
            reason = (item.get("ctx") or {}).get("error")
            where, msg = "body", f"invalid JSON ({reason})" if reason else "invalid JSON"
        parts.append(f"{where}: {msg}")
    return "; ".join(parts) or "invalid request"


def error_detail(exc: errors.EmberboxError) -> ErrorDetail:
    """The ``error`` of an error body (or of a stream's ``error`` event) for ``exc``."""
    extra: dict[str, Any] = {}
    if isinstance(exc, errors.ImageNotFound):
        extra["image"] = exc.name
        extra["available"] = list(exc.available)
    if isinstance(exc, errors.VMMError) and exc.console_tail:
        extra["console_tail"] = exc.console_tail
    if isinstance(exc, errors.QuotaExceeded):
        for name in ("quota", "limit", "used"):
            if name in exc.details:
                extra[name] = exc.details[name]
    return ErrorDetail(type=type(exc).__name__, message=exc.message, **extra)


# Errors that are a limit saying no, counted apart as refusals (emberbox_refusals_total).
_REFUSALS = {"RateLimited": "rate_limited", "Unauthorized": "failed_auth", "QuotaExceeded": "quota"}


def count_error(type_name: str) -> None:
    """One more answered error of this type (and refusal, for a limit's)."""
    metrics.ERRORS.labels(type_name).inc()
    if type_name in _REFUSALS:
        metrics.REFUSALS.labels(_REFUSALS[type_name]).inc()


async def _emberbox_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.EmberboxError)
    count_error(type(exc).__name__)
    if exc.status_code >= 500:
        log.warning("%s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
    body = ErrorBody(error=error_detail(exc))
    response = JSONResponse(status_code=exc.status_code, content=body.model_dump(exclude_none=True))
    if isinstance(exc, errors.RateLimited | errors.NoCapacity):
        response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    return response


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    count_error(VALIDATION_ERROR)
    return error_response(422, VALIDATION_ERROR, format_validation_errors(exc.errors()))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    # Routing errors (unknown path, wrong method), unparseable bodies and the auth check.
    assert isinstance(exc, StarletteHTTPException)
    names = {400: "InvalidRequest", 401: "Unauthorized", 404: "NotFound", 405: "MethodNotAllowed"}
    name = names.get(exc.status_code, "HTTPError")
    count_error(name)
    response = error_response(exc.status_code, name, exc.detail)
    response.headers.update(exc.headers or {})
    return response


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # Last resort: a bug. Starlette re-raises after this so the server logs the traceback.
    log.error("unhandled %s on %s %s", type(exc).__name__, request.method, request.url.path)
    count_error("InternalError")
    return error_response(500, "EmberboxError", "internal error (see the server log)")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(errors.EmberboxError, _emberbox_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)


async def render_error(request: Request, exc: errors.EmberboxError) -> JSONResponse:
    """The answer the handlers give ``exc``, for middleware that answers before them."""
    return await _emberbox_error(request, exc)
