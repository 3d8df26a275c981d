"""Connect RPC plumbing for envd's services: request bodies (a JSON object for unary
calls, one envelope for streams), error answers, and :class:`EnvelopeStream`, the
response of a server-streaming call.

A stream answers 200 with its first message (or at once); what fails after that ends
the stream with an error envelope (``{"error": {"code", "message"}}``), never a changed
status. A stream made with ``early_errors`` answers an error raised before its first
message as a unary call does (an HTTP status), like a Start whose command could not run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from emberbox import errors
from emberbox.e2b import envelope
from emberbox.e2b.front import (
    EnvdCall,
    SandboxGone,
    api_error,
    connect_code,
    connect_error,
    envd_call,
    retry_after,
)

log = logging.getLogger(__name__)

CONNECT_JSON = "application/connect+json"
KEEPALIVE_S = 30.0  # the SDK expects a keepalive at least every 50 s

Emit = Callable[[dict[str, Any]], Awaitable[None]]
Produce = Callable[[Emit], Awaitable[None]]
Unary = Callable[[EnvdCall, dict[str, Any], Request], Awaitable[dict[str, Any]]]


def deadline_s(request: Request) -> float | None:
    """``Connect-Timeout-Ms`` in seconds; None when absent (no deadline)."""
    raw = request.headers.get("connect-timeout-ms")
    if raw is None or not raw.strip().isdigit():
        return None
    ms = int(raw)
    return ms / 1000 if ms > 0 else None


async def unary(request: Request, handler: Unary) -> Response:
    """A unary call: check the sandbox and token, parse the JSON body, run ``handler``."""
    try:
        call = await envd_call(request)
        raw = await request.body()
        body = json.loads(raw) if raw.strip() else {}
        if not isinstance(body, dict):
            raise errors.InvalidRequest("the request must be a JSON object")
        return JSONResponse(await handler(call, body, request))
    except ValueError:
        return connect_error("invalid_argument", "the request is not JSON")
    except errors.EmberboxError as exc:
        return error_answer(exc)


def error_answer(exc: errors.EmberboxError) -> Response:
    if isinstance(exc, SandboxGone):
        return api_error(502, exc.message)
    if isinstance(exc, errors.Unauthorized):
        return connect_error("unauthenticated", exc.message)
    return connect_error(connect_code(exc), exc.message, retry_after(exc))


async def stream_request(request: Request) -> tuple[EnvdCall, dict[str, Any]]:
    call = await envd_call(request)
    raw = await request.body()
    try:
        if request.headers.get("content-type", "").startswith(CONNECT_JSON):
            return call, envelope.decode_one(raw)
        body = json.loads(raw) if raw.strip() else {}
    except (envelope.EnvelopeError, ValueError) as exc:
        raise errors.InvalidRequest(f"malformed request: {exc}") from None
    if not isinstance(body, dict):
        raise errors.InvalidRequest("the request must be a JSON object")
    return call, body


class EnvelopeStream(Response):
    """A Connect server stream: ``produce(emit)`` sends messages as envelopes, a
    keepalive goes out when it is quiet, and the end-of-stream envelope closes it (with
    the error ``produce`` raised, if any). A client that leaves cancels ``produce``."""

    media_type = CONNECT_JSON

    def __init__(
        self,
        produce: Produce,
        keepalive: dict[str, Any] | None = None,
        *,
        early_errors: bool = False,
    ) -> None:
        self.produce = produce
        self.keepalive = keepalive
        self.early_errors = early_errors
        self.status_code = 200
        self.background = None
        self.init_headers(None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        lock, started = anyio.Lock(), False

        async def begin() -> None:  # under the lock
            nonlocal started
            if not started:
                started = True
                start = {"type": "http.response.start", "status": 200}
                await send({**start, "headers": self.raw_headers})

        async def write(data: bytes) -> None:
            async with lock:
                await begin()
                await send({"type": "http.response.body", "body": data, "more_body": True})

        async def emit(message: dict[str, Any]) -> None:
            await write(self.frame(message))

        if not self.early_errors:
            async with lock:
                await begin()
        early: errors.EmberboxError | None = None
        error: tuple[str, str] | None = None
        gone_away = False
        async with anyio.create_task_group() as tg:
            tg.start_soon(_cancel_on_disconnect, receive, tg.cancel_scope)
            if self.keepalive is not None:
                tg.start_soon(_keepalive, emit, self.keepalive)
            try:
                await self.produce(emit)
            except errors.EmberboxError as exc:
                early, error = (exc if not started else None), _stream_error(exc)
            except OSError:
                gone_away = True
            tg.cancel_scope.cancel()
        if gone_away:
            return
        if early is not None:
            await error_answer(early)(scope, receive, send)
            return
        try:
            await write(self.closing(error))
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass

    def frame(self, message: dict[str, Any]) -> bytes:
        return envelope.encode(message)

    def closing(self, error: tuple[str, str] | None) -> bytes:
        return envelope.end_stream(error)


def _stream_error(exc: errors.EmberboxError) -> tuple[str, str]:
    """A sandbox gone mid-stream ends with ``unavailable`` and no "was not found": the SDK
    then probes /health and raises its "not running" error (PROTOCOL.md 2.1)."""
    if isinstance(exc, (errors.AgentError, errors.VMMError, SandboxGone)) and not isinstance(
        exc, errors.ExecTimeout
    ):
        return "unavailable", "the sandbox stopped during the call"
    if isinstance(exc, errors.Conflict):
        return "unavailable", "the sandbox is not running"
    return connect_code(exc), exc.message


async def _keepalive(emit: Emit, message: dict[str, Any]) -> None:
    while True:
        await anyio.sleep(KEEPALIVE_S)
        await emit(message)


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()
