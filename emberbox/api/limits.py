"""Request bodies under hostile load (pure ASGI, inside :mod:`.observe`).

:class:`BodyGuard` hands every HTTP request a ``receive`` that, the first time the route
asks for its body (the router has picked the route by then: ``scope["route"]``):

1. refuses a ``Content-Length`` over the route's limit (413) without reading a byte;
2. authenticates the caller of one of our JSON routes before its body is read, so a
   caller without a key gets its 401 for the price of its headers, not of its body
   (FastAPI reads and parses a JSON body before it runs any dependency); the principal
   is kept for the route's own check (:func:`auth.authenticate` returns it again);
3. counts the body's bytes: past the limit the request is answered 413 at once and the
   connection closed; the route sees a disconnect;
4. gives the body a deadline: a JSON body must arrive whole within
   ``request_body_timeout_s``, any other body each of its chunks (408, connection closed).

JSON routes (a FastAPI route with a body model, not a form) are limited to
``max_request_body_bytes``. Raw bodies (file and archive uploads, forms, proxied
streams, mounted apps) keep their own, larger limits (``max_upload_bytes``, checked by
the route) and get only the deadline.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
from fastapi import params
from fastapi.routing import APIRoute
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from emberbox import errors
from emberbox.api import auth
from emberbox.api.errors import count_error, error_response, render_error
from emberbox.config import Settings

DISCONNECT: Message = {"type": "http.disconnect"}
# Their JSON routes all sit behind authenticate() (the cluster replica's too).
OUR_ROUTES = ("emberbox.api.routes.", "emberbox.api.cluster.")


def is_json_route(route: Any) -> bool:
    """A FastAPI route that parses its body as JSON into a model."""
    if not isinstance(route, APIRoute) or route.body_field is None:
        return False
    return not isinstance(route.body_field.field_info, params.Form)  # File is a Form


def authenticates_first(route: Any) -> bool:
    return is_json_route(route) and route.endpoint.__module__.startswith(OUR_ROUTES)


def declared_length(scope: Scope) -> int | None:
    """The request's Content-Length, None without a usable one."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else None
    return None


class BodyGuard:
    """See the module docstring; ``settings`` gives the limits."""

    def __init__(self, app: ASGIApp, *, settings: Settings) -> None:
        self.app = app
        self.max_bytes = settings.max_request_body_bytes
        self.timeout_s = settings.request_body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = BodyReader(scope, receive, send, self.max_bytes, self.timeout_s)
        await self.app(scope, body.receive, body.send)


class BodyReader:
    """The ``receive``/``send`` pair a route gets: bytes counted, a deadline, and once
    the guard answered, the route's own answer dropped."""

    def __init__(
        self, scope: Scope, receive: Receive, send: Send, max_bytes: int, timeout_s: float
    ) -> None:
        self.limit: int | None = None  # decided at the first read, by the route
        self._max_bytes = max_bytes
        self._first = True
        self._scope = scope
        self._receive, self._send = receive, send
        self._timeout_s = timeout_s
        self._deadline = time.monotonic() + timeout_s
        self.seen = 0
        self.complete = False
        self.started = False
        self.answered = False

    async def receive(self) -> Message:
        if self._first:
            self._first = False
            await self._before_the_body()
        if self.answered:
            return DISCONNECT
        if self.complete:  # the body is in: waiting for a disconnect is no one's fault
            return await self._receive()
        # A JSON body has one deadline for all of it; an upload one per chunk.
        wait_s = self._timeout_s if self.limit is None else self._deadline - time.monotonic()
        with anyio.move_on_after(max(0.0, wait_s)) as scope:
            message = await self._receive()
        if scope.cancelled_caught:
            count_error("RequestTimeout")
            await self._refuse(error_response(408, "RequestTimeout", self._late_message()))
            return DISCONNECT
        if message["type"] == "http.request":
            self.seen += len(message.get("body", b""))
            self.complete = not message.get("more_body", False)
            if self.limit is not None and self.seen > self.limit:
                await self.refuse_size()
                return DISCONNECT
        return message

    async def _before_the_body(self) -> None:
        """The route is known now: its limit, the declared length, then who calls."""
        route = self._scope.get("route")
        self._deadline = time.monotonic() + self._timeout_s
        if is_json_route(route):
            self.limit = self._max_bytes
            length = declared_length(self._scope)
            if length is not None and length > self.limit:
                await self.refuse_size()
                return
        if authenticates_first(route):
            try:
                await auth.authenticate(HTTPConnection(self._scope))
            except errors.EmberboxError as exc:
                await self._refuse(await render_error(Request(self._scope), exc))

    async def send(self, message: Message) -> None:
        if self.answered:
            return
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)

    async def refuse_size(self) -> None:
        exc = errors.PayloadTooLarge(
            f"request body larger than {self.limit} bytes (max_request_body_bytes); "
            "send files through the upload routes",
            quota="max_request_body_bytes",
            limit=self.limit,
        )
        await self._refuse(await render_error(Request(self._scope), exc))

    async def answer(self, response: Response) -> None:
        """Send ``response`` and close the connection after it: the body it leaves
        unread is not worth reading."""
        response.headers["Connection"] = "close"
        self.answered = True
        await response(self._scope, self._receive, self._send)

    async def _refuse(self, response: Response) -> None:
        if self.started or self.answered:  # too late for an answer: just cut the body off
            self.answered = True
            return
        await self.answer(response)

    def _late_message(self) -> str:
        what = "each chunk of the body" if self.limit is None else "the whole body"
        return f"request body too slow: {what} must arrive within {self._timeout_s:g} s"
