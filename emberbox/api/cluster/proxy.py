"""HTTP requests forwarded to a host's server, streamed both ways (cluster mode).

The request body goes to the host as the caller sends it (``request.stream()``), the
answer comes back as the host sends it (``aiter_raw``: still encoded, its
``Content-Length`` kept), neither whole in memory. Headers that concern one connection
(hop-by-hop) are dropped, as are the caller's key and ``Host``; the host gets its own
admin key instead. Host errors (any status) pass through as the host wrote them. A host
that cannot be reached, or that refuses the replica's key (it restarted: a new key), is
:class:`errors.HostDown` (503).

The pure parts (:func:`request_headers`, :func:`response_headers`, :func:`upstream_url`)
are unit-tested without a host.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable

import anyio
import httpx
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from emberbox import errors
from emberbox.logs import request_context

log = logging.getLogger(__name__)

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Never passed to a host: the caller's key (the host gets its own) and the caller's Host.
DROPPED_REQUEST = frozenset({b"host", b"authorization", b"x-api-key", b"cookie"})
# The replica's own answer carries its own of these.
DROPPED_RESPONSE = frozenset({b"server", b"date", b"x-request-id"})
CONNECT_TIMEOUT_S = 5.0
POOL_TIMEOUT_S = 10.0


def _named_in_connection(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """Headers a ``Connection:`` header lists: hop-by-hop too (RFC 9110 7.6.1)."""
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(token.strip().lower() for token in value.split(b",") if token.strip())
    return named


def request_headers(
    headers: Iterable[tuple[bytes, bytes]], *, key: str, request_id: str | None = None
) -> list[tuple[bytes, bytes]]:
    """The headers to send the host: the caller's, without hop-by-hop ones, its key,
    its Host and cookies; with the host's ``key`` (and the replica's request id, so the
    two servers' log lines of one call can be matched)."""
    headers = list(headers)
    dropped = HOP_BY_HOP | DROPPED_REQUEST | _named_in_connection(headers) | {b"x-request-id"}
    kept = [(name, value) for name, value in headers if name.lower() not in dropped]
    kept.append((b"authorization", f"Bearer {key}".encode()))
    if request_id:
        kept.append((b"x-request-id", request_id.encode("latin-1")))
    return kept


def response_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The host's answer headers a caller gets: without hop-by-hop ones and those the
    replica sets itself."""
    headers = list(headers)
    dropped = HOP_BY_HOP | DROPPED_RESPONSE | _named_in_connection(headers)
    return [(name.lower(), value) for name, value in headers if name.lower() not in dropped]


def upstream_url(base_url: str, path: str, query: bytes = b"") -> str:
    """The host's URL for ``path`` (already percent-encoded, as the caller sent it)."""
    url = base_url.rstrip("/") + path
    return f"{url}?{query.decode('latin-1')}" if query else url


class UpstreamResponse(Response):
    """The host's answer, relayed chunk by chunk. The host connection is closed when
    the answer is through, when the caller goes away, or on an error."""

    def __init__(self, upstream: httpx.Response) -> None:
        self.upstream = upstream
        self.status_code = upstream.status_code
        self.background = None
        self.raw_headers = response_headers(upstream.headers.raw)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch_disconnect, receive, tg.cancel_scope)
                await self._relay(send)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.upstream.aclose()

    async def _relay(self, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        try:
            async for chunk in self.upstream.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except httpx.HTTPError as exc:  # the host went away mid-answer: cut it off
            log.warning("host answer cut off: %s", exc or type(exc).__name__)
            raise
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _watch_disconnect(receive: Receive, done: anyio.CancelScope) -> None:
        while True:  # the request body is in already: only a disconnect can come
            message = await receive()
            if message["type"] == "http.disconnect":
                done.cancel()
                return


class HostProxy:
    """One HTTP client (connection pool) for every host of one replica."""

    def __init__(self) -> None:
        timeout = httpx.Timeout(None, connect=CONNECT_TIMEOUT_S, pool=POOL_TIMEOUT_S)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        self.client = httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False)

    async def close(self) -> None:
        await self.client.aclose()

    async def open(
        self,
        host: str,
        method: str,
        url: str,
        headers: list[tuple[bytes, bytes]],
        content: bytes | AsyncIterator[bytes] | None = None,
    ) -> httpx.Response:
        """Send a request to ``host``'s server; its answer with the body unread.
        HostDown when the host cannot be reached or refuses the replica's key."""
        request = self.client.build_request(method, url, headers=headers, content=content)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.TransportError as exc:
            raise errors.HostDown(
                f"host {host} does not answer ({type(exc).__name__}); try again later",
                host_error=type(exc).__name__,
            ) from exc
        if response.status_code == 401:  # our key, not the caller's: the host restarted
            await response.aclose()
            raise errors.HostDown(f"host {host} refused the replica's key; try again shortly")
        return response

    async def forward(
        self, request: Request, host: str, base_url: str, key: str, *, path: str | None = None
    ) -> UpstreamResponse:
        """Relay ``request`` (its path, or ``path``) to the host at ``base_url``."""
        scope = request.scope
        target = path if path is not None else scope.get("raw_path", b"").decode("latin-1")
        if not target:
            target = request.url.path
        url = upstream_url(base_url, target, scope.get("query_string", b""))
        headers = request_headers(scope["headers"], key=key, request_id=_request_id(request))
        content = None if _bodiless(request) else request.stream()
        return UpstreamResponse(await self.open(host, request.method, url, headers, content))


def _bodiless(request: Request) -> bool:
    """A request without a body: no length (or 0) and not chunked."""
    headers = request.headers
    if "transfer-encoding" in headers:
        return False
    return headers.get("content-length", "0").strip() in ("", "0")


def _request_id(request: Request) -> str | None:
    """This request's id (observe.py gave it one), for the host's log lines."""
    ctx = request_context.get()
    return ctx.request_id if ctx is not None else None
