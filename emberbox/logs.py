"""Log lines for people (text, the default) or for log shippers (``EMBERBOX_LOG_FORMAT=json``).

A JSON line is one object: ``time`` (RFC 3339, UTC), ``level``, ``logger``, ``message``,
and, when the line was caused by an HTTP request, ``request_id``, ``tenant`` and
``sandbox_id``; the line that ends a request adds ``method``, ``path``, ``status`` and
``duration_ms``. The request's fields come from :data:`request_context`, set by the API's
middleware for the task that serves the request and filled in as the request is
authenticated and routed (a mutable holder, so that what the route learns reaches the
middleware's closing line too).
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

LogFormat = Literal["text", "json"]

TEXT_FORMAT = "%(levelname)s:     %(name)s: %(message)s%(request_suffix)s"
# Fields a caller may attach with ``extra={...}`` that a JSON line carries as they are.
EXTRA_FIELDS = ("method", "path", "status", "duration_ms")


@dataclass
class RequestContext:
    """What the log lines of one request share; routes fill in tenant and sandbox."""

    request_id: str
    tenant: str | None = None
    sandbox_id: str | None = None


request_context: ContextVar[RequestContext | None] = ContextVar(
    "emberbox_request_context", default=None
)


class ContextFilter(logging.Filter):
    """Copies the current request's fields onto every record (None outside requests)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = request_context.get()
        record.request_id = ctx.request_id if ctx else None
        record.tenant = ctx.tenant if ctx else None
        record.sandbox_id = ctx.sandbox_id if ctx else None
        record.request_suffix = f" [request {ctx.request_id}]" if ctx else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line; never raises on odd values (they become strings)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in ("request_id", "tenant", "sandbox_id", *EXTRA_FIELDS):
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def configure(log_format: LogFormat, level: int = logging.INFO) -> None:
    """Send every logger's lines (uvicorn's too) to stderr in ``log_format``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("emberbox").setLevel(level)  # the CLI may have set WARNING
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uv = logging.getLogger(name)
        uv.handlers.clear()
        uv.propagate = True
