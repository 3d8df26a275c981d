"""Responses whose body is written as the work produces it: NDJSON events, raw bytes.

A :class:`StreamedResponse` runs ``produce(write)``; each ``write`` goes to the client at
once and waits while the client is slow (backpressure reaches the guest agent), and a
client that disconnects cancels ``produce``. A byte stream sends its status line with
its first chunk, so an error before any byte (an unreadable file) is an ordinary error
answer. An error after the status line went out cannot change it: an NDJSON stream
(whose status line goes out at once) then ends with an ``error`` event, a byte stream is
cut short (no final chunk), which HTTP clients report as an incomplete body.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

import anyio
from fastapi.encoders import jsonable_encoder
from pydantic import BaseModel
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from emberbox import errors
from emberbox.api.errors import error_detail
from emberbox.models import ErrorBody, ErrorDetail, ErrorEvent, ExitEvent, OutputEvent

log = logging.getLogger(__name__)

Write = Callable[[bytes], Awaitable[None]]
Produce = Callable[[Write], Awaitable[None]]
Stream = Literal["stdout", "stderr"]

# OpenAPI: what each line of an NDJSON answer is (the routes that stream name the models).
STREAM_EVENT_SCHEMA = {
    "type": "object",
    "oneOf": [
        {"$ref": f"#/components/schemas/{model.__name__}"}
        for model in (OutputEvent, ExitEvent, ErrorEvent)
    ],
}


NDJSON = "application/x-ndjson"
OCTET_STREAM = "application/octet-stream"


class StreamedResponse(Response):
    """A body written by ``produce(write)`` as it runs (chunked transfer encoding).

    The media type is the instance's: as a route's ``response_class`` it leaves OpenAPI
    to document the route's error answers as JSON (routes list the 200 content).
    """

    media_type = None

    def __init__(
        self,
        produce: Produce,
        *,
        media_type: str = OCTET_STREAM,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        start_at_once: bool = False,
    ) -> None:
        self.produce = produce
        self.status_code = status_code
        self.media_type = media_type
        self.background = None
        self.start_at_once = start_at_once  # else: with the first chunk (or the end)
        self.init_headers(headers)  # no body attribute: no Content-Length

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def start() -> None:
            nonlocal started
            if not started:
                started = True
                status, headers = self.status_code, self.raw_headers
                await send({"type": "http.response.start", "status": status, "headers": headers})

        async def write(data: bytes) -> None:
            if data:
                await start()
                await send({"type": "http.response.body", "body": data, "more_body": True})

        if self.start_at_once:
            await start()
        complete, failure = False, None
        async with anyio.create_task_group() as tg:
            tg.start_soon(_cancel_on_disconnect, receive, tg.cancel_scope)
            try:
                await self.produce(write)
                complete = True
            except errors.EmberboxError as exc:
                failure = exc
            except OSError:
                pass  # the client went away while we wrote
            tg.cancel_scope.cancel()
        if failure is not None and not started:
            await _error_answer(scope, failure)(scope, receive, send)
        elif failure is not None:
            log.warning("%s: stream cut short: %s", scope.get("path"), failure.message)
        elif complete:
            await start()
            await send({"type": "http.response.body", "body": b"", "more_body": False})


def _error_answer(scope: Scope, exc: errors.EmberboxError) -> JSONResponse:
    """The error answer ``exc`` gets from the app's handler, for a stream that failed
    before its first byte."""
    if exc.status_code >= 500:
        log.warning("%s: %s: %s", scope.get("path"), type(exc).__name__, exc)
    body = ErrorBody(error=error_detail(exc)).model_dump(exclude_none=True)
    return JSONResponse(status_code=exc.status_code, content=body)


def ndjson_response(produce: Produce) -> StreamedResponse:
    """One JSON document per line (``application/x-ndjson``): StreamEvents. The status
    line goes out at once; an error after it is the stream's last event."""
    return StreamedResponse(produce, media_type=NDJSON, start_at_once=True)


JSON_SLICE_CHARS = 64 * 1024  # characters of a long string encoded (and sent) at a time


def json_response(model: BaseModel) -> StreamedResponse:
    """``model`` as the JSON answer FastAPI would send, written as it is encoded.

    A command's 16 MiB of output can take six times that as JSON (``\\u0000`` per NUL
    byte), and encoding the whole body at once costs twice that again: long strings
    are encoded and sent a slice at a time instead, waiting for the client.
    """
    content = jsonable_encoder(model)

    async def produce(write: Write) -> None:
        await write(b"{")
        for index, (key, value) in enumerate(content.items()):
            await write((("," if index else "") + _dumps(key) + ":").encode())
            if not isinstance(value, str) or len(value) <= JSON_SLICE_CHARS:
                await write(_dumps(value).encode())
                continue
            await write(b'"')
            for start in range(0, len(value), JSON_SLICE_CHARS):
                await write(_dumps(value[start : start + JSON_SLICE_CHARS])[1:-1].encode())
            await write(b'"')
        await write(b"}")

    return StreamedResponse(produce, media_type="application/json")


def _dumps(value: Any) -> str:
    """As Starlette's JSONResponse renders JSON."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def streamed_content(media_type: str, schema: dict[str, Any]) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` entry documenting a streamed 200 answer."""
    return {200: {"description": "Streamed", "content": {media_type: {"schema": schema}}}}


BINARY_SCHEMA: dict[str, Any] = {"type": "string", "format": "binary"}


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


def event_line(event: BaseModel) -> bytes:
    """One NDJSON line; null fields are left out, except in the exit event."""
    text = event.model_dump_json(exclude_none=not isinstance(event, ExitEvent))
    return text.encode("utf-8") + b"\n"


class OutputEvents:
    """Output chunks as NDJSON ``stdout``/``stderr`` events, never splitting a UTF-8
    character between two events; :meth:`finish` writes what is held back and the last
    event (``exit`` or ``error``)."""

    def __init__(self, write: Write) -> None:
        self._write = write
        self._held: dict[Stream, bytes] = {"stdout": b"", "stderr": b""}

    async def stdout(self, chunk: bytes) -> None:
        await self._output("stdout", chunk)

    async def stderr(self, chunk: bytes) -> None:
        await self._output("stderr", chunk)

    async def _output(self, stream: Stream, chunk: bytes) -> None:
        ready, self._held[stream] = split_utf8(self._held[stream] + chunk)
        if ready:
            await self._write(event_line(OutputEvent.from_bytes(stream, ready)))

    async def flush(self) -> None:
        """Write what waits for the rest of a character (it will not come)."""
        for stream, held in self._held.items():
            if held:
                await self._write(event_line(OutputEvent.from_bytes(stream, held)))
        self._held = {"stdout": b"", "stderr": b""}

    async def finish(self, last: ExitEvent | ErrorEvent) -> None:
        await self.flush()
        await self._write(event_line(last))

    async def fail(self, exc: Exception) -> None:
        """End the stream with an ``error`` event for ``exc`` (a bug: a generic one)."""
        if isinstance(exc, errors.EmberboxError):
            detail = error_detail(exc)
        else:
            log.error("stream failed", exc_info=exc)
            detail = ErrorDetail(
                type="EmberboxError", message="internal error (see the server log)"
            )
        await self.finish(ErrorEvent(error=detail))


def split_utf8(data: bytes) -> tuple[bytes, bytes]:
    """``data`` cut before a UTF-8 sequence that its last bytes begin but do not finish:
    (what can go out now, what waits for the next chunk)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:  # a continuation byte: the lead byte is further back
            continue
        if 0xC2 <= byte <= 0xF4:  # the lead byte of a 2-, 3- or 4-byte sequence
            needed = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            if needed > back:
                return data[:-back], data[-back:]
        break
    return data, b""
