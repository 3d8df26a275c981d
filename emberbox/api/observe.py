"""Every HTTP request gets an id, a closing log line and its metrics (pure ASGI).

The id is the client's ``X-Request-Id`` when it is a sane token (at most 128 of
``[A-Za-z0-9._:-]``), else a fresh one; it is echoed in the response's ``X-Request-Id``
and carried by every log line the request causes (:mod:`emberbox.logs`). Written as
plain ASGI, not Starlette's ``BaseHTTPMiddleware``, so streamed bodies stay streamed.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from emberbox.logs import RequestContext, request_context
from emberbox.service import metrics

log = logging.getLogger("emberbox.http")

_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Requests that would only drown the log (a Prometheus scrape, load-balancer probes).
_QUIET_ROUTES = frozenset({"/metrics", "/healthz"})


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    """The caller's request id when it is a sane token, else a fresh one."""
    for name, value in headers:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if _SANE_ID.fullmatch(text):
                return text
            break
    return uuid.uuid4().hex


def route_of(scope: Scope) -> str:
    """The matched route's template (``/v1/sandboxes/{sandbox_id}``), never the raw path:
    ids in label values would make the metric's cardinality unbounded."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class ObserveMiddleware:
    """Request id, log context, HTTP metrics and one closing log line per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        ctx = RequestContext(request_id_from(scope.get("headers", [])))
        token = request_context.set(ctx)
        started = time.monotonic()
        status = 500 if scope["type"] == "http" else 101

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers: list[Any] = list(message.get("headers", []))
                headers.append((b"x-request-id", ctx.request_id.encode("ascii")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._finish(scope, ctx, status, time.monotonic() - started)
            request_context.reset(token)

    @staticmethod
    def _finish(scope: Scope, ctx: RequestContext, status: int, seconds: float) -> None:
        route = route_of(scope)
        method = scope.get("method", "WEBSOCKET")
        metrics.HTTP_REQUESTS.labels(method, route, str(status)).inc()
        metrics.HTTP_SECONDS.labels(method, route).observe(seconds)
        if ctx.sandbox_id is None:
            params = scope.get("path_params") or {}
            sandbox_id = params.get("sandbox_id")
            ctx.sandbox_id = str(sandbox_id) if sandbox_id is not None else None
        if route in _QUIET_ROUTES and status < 400:
            return
        log.info(
            "%s %s -> %d in %.1f ms",
            method,
            scope.get("path", ""),
            status,
            seconds * 1000,
            extra={
                "method": method,
                "path": scope.get("path", ""),
                "status": status,
                "duration_ms": round(seconds * 1000, 2),
            },
        )
