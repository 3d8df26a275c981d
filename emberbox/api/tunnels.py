"""HTTP and WebSocket traffic relayed to a server inside a sandbox over one tunnel.

A tunnel (:class:`~emberbox.agent_client.calls.ByteTunnel`) is a TCP connection to
``127.0.0.1:port`` in the guest, carried by the agent's channel. Over it:

- :func:`forward_http` speaks HTTP/1.1 as a client (``h11``, one request per tunnel,
  ``Connection: close``): the request body streams to the guest as the caller sends it,
  the response body streams back as the guest sends it, neither whole in memory;
- :func:`forward_websocket` opens a WebSocket to the guest's server (the sans-I/O
  client of ``websockets``) and relays messages both ways;
- :func:`relay_raw` carries raw TCP in binary WebSocket messages (``emberbox
  port-forward``): an empty binary message half-closes the guest side.

A guest port nothing listens on is a 502 ``PortUnreachable`` (HTTP) or a close with
4502 (WebSocket), never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import quote

import h11
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidHandshake
from websockets.frames import Frame, Opcode
from websockets.http11 import Response as WsResponse
from websockets.protocol import State
from websockets.uri import parse_uri

from emberbox import errors
from emberbox.agent_client.calls import ByteTunnel
from emberbox.api.errors import error_response

TARGET_SAFE = "/:@!$&'()*+,;=-._~"  # what a request target may carry unencoded

log = logging.getLogger(__name__)

Closer = Callable[[], Awaitable[None]]
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
    }
)
API_KEY_HEADERS = frozenset({b"authorization", b"x-api-key"})  # never passed to the guest
CLOSE_UNREACHABLE = 4502  # a WebSocket close: 4000 + the HTTP status
CLOSE_NORMAL = 1000


class Unreachable(Exception):
    """The guest's server did not answer as asked (nothing listening, not HTTP)."""


def unreachable_response(port: int, reason: str) -> Response:
    return error_response(502, "PortUnreachable", f"port {port} in the sandbox: {reason}")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, errors.AgentRequestFailed):
        return exc.message.removeprefix("PortUnreachable: ")
    return str(exc) or type(exc).__name__


def upstream_headers(
    request_headers: list[tuple[bytes, bytes]], port: int, prefix: str, keep_auth: bool
) -> list[tuple[bytes, bytes]]:
    """The headers the guest's server gets: the caller's, less the hop-by-hop ones and
    (on keyed routes) the API key, plus where the request came from."""
    dropped = HOP_BY_HOP if keep_auth else HOP_BY_HOP | API_KEY_HEADERS
    headers = [(k, v) for k, v in request_headers if k.lower() not in dropped]
    host = dict(request_headers).get(b"host", b"")
    headers += [(b"host", f"localhost:{port}".encode()), (b"connection", b"close")]
    headers += [(b"x-forwarded-host", host), (b"x-forwarded-prefix", prefix.encode())]
    return headers


async def forward_http(
    request: Request, tunnel: ByteTunnel, path: str, prefix: str, closer: Closer, *, keep_auth: bool
) -> Response:
    """Relay one HTTP request to the guest's server and stream its answer back.

    ``closer`` ends the tunnel: it runs once the answer was sent (or failed)."""
    conn = h11.Connection(h11.CLIENT)
    raw = [(k.lower(), v) for k, v in request.headers.raw]
    headers = upstream_headers(raw, tunnel.port, prefix, keep_auth)
    chunked = b"content-length" not in dict(raw) and b"transfer-encoding" in dict(raw)
    if chunked:
        headers.append((b"transfer-encoding", b"chunked"))
    # The route hands over the path decoded: encode it again, so that any character the
    # client sent (non-ASCII, controls) makes a valid request target for the guest.
    target = (
        "/" + quote(path, safe=TARGET_SAFE) + (f"?{request.url.query}" if request.url.query else "")
    )
    head = h11.Request(method=request.method, target=target.encode(), headers=headers)
    try:
        await tunnel.send(conn.send(head) or b"")
        sender = asyncio.create_task(_send_body(request, conn, tunnel))
        try:
            answer = await _response_head(conn, tunnel)
            await sender  # the whole request is in before its answer streams
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
    except (Unreachable, errors.AgentRequestFailed, h11.ProtocolError) as exc:
        await closer()
        return unreachable_response(tunnel.port, _reason(exc))
    except BaseException:
        await closer()
        raise
    kept = [(k, v) for k, v in answer.headers if k.lower() not in HOP_BY_HOP]
    response = StreamingResponse(
        _response_body(conn, tunnel, closer),
        status_code=answer.status_code,
        background=BackgroundTask(closer),
    )
    response.raw_headers = [(k.lower(), v) for k, v in kept]
    return response


async def _send_body(request: Request, conn: h11.Connection, tunnel: ByteTunnel) -> None:
    async for chunk in request.stream():
        if chunk:
            await tunnel.send(conn.send(h11.Data(data=chunk)) or b"")
    await tunnel.send(conn.send(h11.EndOfMessage()) or b"")


async def _next_event(conn: h11.Connection, tunnel: ByteTunnel) -> object:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await tunnel.receive())  # b"" is the end of the stream


async def _response_head(conn: h11.Connection, tunnel: ByteTunnel) -> h11.Response:
    while True:
        event = await _next_event(conn, tunnel)
        if isinstance(event, h11.Response):
            return event
        if isinstance(event, h11.ConnectionClosed):
            raise Unreachable("the server closed the connection without an answer")
        if not isinstance(event, h11.InformationalResponse):
            raise Unreachable(f"unexpected {type(event).__name__} from the server")


async def _response_body(
    conn: h11.Connection, tunnel: ByteTunnel, closer: Closer
) -> AsyncIterator[bytes]:
    try:
        while True:
            event = await _next_event(conn, tunnel)
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return
    except (errors.EmberboxError, h11.ProtocolError) as exc:
        log.info("port %d: response cut short: %s", tunnel.port, exc)
    finally:
        await closer()


# -- WebSockets -----------------------------------------------------------------------------


async def forward_websocket(websocket: WebSocket, tunnel: ByteTunnel, path: str) -> None:
    """Open a WebSocket to the guest's server, accept the caller's, relay messages."""
    query = websocket.url.query
    uri = parse_uri(
        f"ws://localhost:{tunnel.port}/{quote(path, safe=TARGET_SAFE)}"
        + (f"?{query}" if query else "")
    )
    offered = list(websocket.scope.get("subprotocols", ()))
    client = ClientProtocol(uri, subprotocols=offered or None, max_size=None)
    try:
        client.send_request(client.connect())
        await _flush(client, tunnel)
        answer = await _handshake(client, tunnel)
    except (InvalidHandshake, Unreachable, errors.AgentRequestFailed) as exc:
        await websocket.close(CLOSE_UNREACHABLE, _reason(exc)[:120])
        return
    await websocket.accept(subprotocol=answer.headers.get("Sec-WebSocket-Protocol"))
    async with _both_ways() as run:
        run(_ws_to_guest(websocket, client, tunnel))
        run(_guest_to_ws(websocket, client, tunnel))


async def _flush(client: ClientProtocol, tunnel: ByteTunnel) -> None:
    for data in client.data_to_send():
        if data:
            await tunnel.send(data)
        else:
            await tunnel.send_eof()


async def _handshake(client: ClientProtocol, tunnel: ByteTunnel) -> WsResponse:
    while True:
        data = await tunnel.receive()
        if data:
            client.receive_data(data)
        else:
            client.receive_eof()
        for event in client.events_received():
            if isinstance(event, WsResponse):
                if client.handshake_exc is not None:
                    raise client.handshake_exc
                return event
        if not data:
            raise Unreachable("the server closed the connection during the handshake")


async def _ws_to_guest(websocket: WebSocket, client: ClientProtocol, tunnel: ByteTunnel) -> None:
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            if client.state is State.OPEN:
                client.send_close(CLOSE_NORMAL)
                await _flush(client, tunnel)
            return
        if message.get("text") is not None:
            client.send_text(message["text"].encode())
        elif message.get("bytes") is not None:
            client.send_binary(message["bytes"])
        await _flush(client, tunnel)


async def _guest_to_ws(websocket: WebSocket, client: ClientProtocol, tunnel: ByteTunnel) -> None:
    parts: list[Frame] = []
    while True:
        data = await tunnel.receive()
        if data:
            client.receive_data(data)
        else:
            client.receive_eof()
        for event in client.events_received():
            if not isinstance(event, Frame):
                continue
            if event.opcode is Opcode.CLOSE:
                code = client.close_rcvd.code if client.close_rcvd else CLOSE_NORMAL
                await _flush(client, tunnel)
                await websocket.close(code if 1000 <= code < 5000 else CLOSE_NORMAL)
                return
            if event.opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
                parts.append(event)
                if event.fin:
                    await _deliver(websocket, parts)
                    parts = []
        await _flush(client, tunnel)  # pongs, the answer to a close
        if not data:
            with contextlib.suppress(RuntimeError):
                await websocket.close(CLOSE_NORMAL)
            return


async def _deliver(websocket: WebSocket, parts: list[Frame]) -> None:
    body = b"".join(bytes(part.data) for part in parts)
    if parts[0].opcode is Opcode.TEXT:
        await websocket.send_text(body.decode("utf-8", errors="replace"))
    else:
        await websocket.send_bytes(body)


async def relay_raw(websocket: WebSocket, tunnel: ByteTunnel) -> None:
    """Raw TCP in binary messages both ways (already accepted); an empty binary message
    from the caller half-closes towards the guest, the guest closing ends the socket."""
    async with _both_ways() as run:
        run(_raw_to_guest(websocket, tunnel))
        run(_raw_to_ws(websocket, tunnel))


async def _raw_to_guest(websocket: WebSocket, tunnel: ByteTunnel) -> None:
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        data = message.get("bytes")
        if data is None:
            continue  # text frames carry nothing here
        if data:
            await tunnel.send(data)
        else:
            await tunnel.send_eof()


async def _raw_to_ws(websocket: WebSocket, tunnel: ByteTunnel) -> None:
    try:
        while data := await tunnel.receive():
            await websocket.send_bytes(data)
    except errors.AgentRequestFailed as exc:
        await websocket.close(CLOSE_UNREACHABLE, _reason(exc)[:120])
        return
    await websocket.close(CLOSE_NORMAL)


@contextlib.asynccontextmanager
async def _both_ways() -> AsyncIterator[Callable[[Awaitable[None]], None]]:
    """Run relays side by side; the first to end (or fail) ends the others."""
    tasks: list[asyncio.Task[None]] = []

    async def wrap(work: Awaitable[None]) -> None:
        await work

    def run(work: Awaitable[None]) -> None:
        tasks.append(asyncio.ensure_future(wrap(work)))

    try:
        yield run
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception) and not isinstance(
                result, WebSocketDisconnect | errors.EmberboxError | RuntimeError
            ):
                log.info("relay ended: %r", result)
