"""WebSockets relayed to a host's server (cluster mode): terminals, port sockets, raw TCP.

The replica checks the caller at the handshake as the native app does (a key, or a
browser's terminal ticket issued by this replica: ``authorize_websocket``), then opens
the same path on the host with the host's admin key and relays messages both ways,
binary as binary and text as text. A close on either side closes the other with the
same code and reason, so a client sees the host's 4404, 4409 or 1000 as it would from a
single server. A host that cannot be reached closes the socket with 4503 (HostDown).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import anyio
import websockets
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import ClientConnection, connect

from emberbox import errors
from emberbox.api import browsers
from emberbox.api.cluster.proxy import request_headers
from emberbox.api.errors import error_detail
from emberbox.api.streams import event_line
from emberbox.models import ErrorEvent

log = logging.getLogger(__name__)

CLOSE_ERROR_BASE = 4000  # + the HTTP status, as the native routes close
OPEN_TIMEOUT_S = 10.0
MAX_MESSAGE_BYTES = 16 << 20  # uvicorn's own default for what a client may send


def websocket_url(base_url: str, path: str, query: bytes = b"") -> str:
    """``ws://`` (or ``wss://``) for the host's ``http(s)://`` base URL and ``path``."""
    scheme, _, rest = base_url.rstrip("/").partition("://")
    ws_scheme = "wss" if scheme == "https" else "ws"
    url = f"{ws_scheme}://{rest}{path}"
    return f"{url}?{query.decode('latin-1')}" if query else url


def host_subprotocols(offered: Sequence[str]) -> list[str]:
    """What the caller offered, without its terminal ticket (redeemed by this replica;
    the host would not know it)."""
    return [item for item in offered if not item.startswith(browsers.TICKET_PREFIX)]


async def refuse(websocket: WebSocket, exc: errors.EmberboxError, *, terminal: bool) -> None:
    """Answer an error as the native routes do: a terminal accepts, sends the error
    event and closes with 4000 + status; a port socket just closes."""
    code = CLOSE_ERROR_BASE + exc.status_code
    reason = exc.message.encode()[:120].decode(errors="ignore")
    with contextlib.suppress(RuntimeError, WebSocketDisconnect, OSError):
        if terminal:
            offered = websocket.scope.get("subprotocols", ())
            await websocket.accept(subprotocol=browsers.chosen_protocol(offered))
            await websocket.send_text(event_line(ErrorEvent(error=error_detail(exc))).decode())
        await websocket.close(code, reason)


def close_for_caller(code: int | None, reason: str | None) -> tuple[int, str]:
    """The close a caller gets for the host's: the same, except that "no status" is a
    normal close and a dropped connection (the host went away) is 4503."""
    if code is None or code == 1005:
        return 1000, reason or ""
    if code == 1006:
        return CLOSE_ERROR_BASE + errors.HostDown.status_code, "the sandbox's host went away"
    return code, reason or ""


async def relay(
    websocket: WebSocket, host: str, base_url: str, key: str, *, terminal: bool
) -> None:
    """Open the caller's path on the host and relay until either side closes."""
    scope = websocket.scope
    path = scope.get("raw_path", b"").decode("latin-1") or scope["path"]
    url = websocket_url(base_url, path, scope.get("query_string", b""))
    headers = [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in request_headers([], key=key)
    ]
    offered = host_subprotocols(scope.get("subprotocols", ()))
    try:
        upstream = await connect(
            url,
            additional_headers=headers,
            subprotocols=[websockets.Subprotocol(item) for item in offered] or None,
            open_timeout=OPEN_TIMEOUT_S,
            max_size=MAX_MESSAGE_BYTES,
            compression=None,
            proxy=None,
        )
    except (OSError, TimeoutError, websockets.exceptions.WebSocketException) as exc:
        error = errors.HostDown(f"host {host} does not answer ({type(exc).__name__})")
        await refuse(websocket, error, terminal=terminal)
        return
    async with upstream:
        await websocket.accept(subprotocol=upstream.subprotocol)
        async with anyio.create_task_group() as tg:
            tg.start_soon(_down, websocket, upstream, tg.cancel_scope)
            await _up(websocket, upstream)
            tg.cancel_scope.cancel()


async def _up(websocket: WebSocket, upstream: ClientConnection) -> None:
    """Caller to host, until the caller disconnects (its close goes on to the host)."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            code = int(message.get("code") or 1000)
            with contextlib.suppress(websockets.exceptions.WebSocketException, OSError):
                await upstream.close(code if 1000 <= code < 5000 and code != 1005 else 1000)
            return
        try:
            if message.get("bytes") is not None:
                await upstream.send(message["bytes"])
            elif message.get("text") is not None:
                await upstream.send(message["text"])
        except websockets.exceptions.ConnectionClosed:
            return  # the host's side closes the caller (_down)


async def _down(websocket: WebSocket, upstream: ClientConnection, done: anyio.CancelScope) -> None:
    """Host to caller, then the host's close code and reason."""
    try:
        async for message in upstream:
            if isinstance(message, bytes):
                await websocket.send_bytes(message)
            else:
                await websocket.send_text(message)
    except websockets.exceptions.ConnectionClosed:
        pass
    except (WebSocketDisconnect, RuntimeError, OSError):  # the caller went away
        done.cancel()
        return
    code, reason = close_for_caller(upstream.close_code, upstream.close_reason)
    with contextlib.suppress(RuntimeError, WebSocketDisconnect, OSError):
        await websocket.close(code, reason[:120])
    done.cancel()
