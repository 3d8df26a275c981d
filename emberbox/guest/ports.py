"""The ``connect`` op: a TCP connection to a port inside the guest, relayed over the
agent's channel (standard library only).

The host reaches servers in the sandbox this way without the guest having a network:
the agent connects to ``127.0.0.1:port`` and relays bytes, the host's STDIN frames to
the socket and the socket's bytes back as STDOUT frames, both ways under the
protocol's window (docs/protocol.md). A zero-length STDIN frame half-closes the socket
towards the guest's server; the guest's server closing its side ends the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

from . import common, protocol
from .channel import Call

CONNECT_TIMEOUT_S = 10.0
LOOPBACK = "127.0.0.1"
WRITE_BATCH = 256 * 1024  # STDIN already received that goes to the socket at once
READ_BATCH = 4 * protocol.DATA_CHUNK  # what one read(2) of the socket may take


class Unreachable(common.RequestError):
    """Nothing accepts connections on the port (refused, or no answer in time)."""

    kind = "PortUnreachable"


async def connect(req: dict[str, Any], call: Call) -> dict[str, Any]:
    port = common.count(req, "port", minimum=1)
    if port > 65535:
        raise common.BadRequest(f"port {port} is not a TCP port (1-65535)")
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(LOOPBACK, port), CONNECT_TIMEOUT_S
        )
    except TimeoutError:
        raise Unreachable(f"no answer on port {port} in {CONNECT_TIMEOUT_S:.0f} s") from None
    except OSError as exc:  # asyncio's message names no reason: the errno does
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise Unreachable(f"{reason}: port {port}") from None
    to_guest = asyncio.create_task(_to_guest(call, writer))
    try:
        to_host = await _to_host(call, reader)
    finally:
        to_guest.cancel()
        await asyncio.gather(to_guest, return_exceptions=True)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    sent = 0 if to_guest.cancelled() or to_guest.exception() else to_guest.result()
    return {"ok": True, "to_host": to_host, "to_guest": sent}


async def _to_host(call: Call, reader: asyncio.StreamReader) -> int:
    """The server's bytes to the host, within the host's window, until it closes."""
    total = 0
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(READ_BATCH):
            for i in range(0, len(data), protocol.DATA_CHUNK):
                await call.send(protocol.Kind.STDOUT, data[i : i + protocol.DATA_CHUNK])
            total += len(data)
    return total


async def _to_guest(call: Call, writer: asyncio.StreamWriter) -> int:
    """The host's bytes to the server; the host's end marker half-closes the socket."""
    total = 0
    with contextlib.suppress(ConnectionError):
        while data := await call.receive(WRITE_BATCH):
            writer.write(data)
            await writer.drain()
            total += len(data)
        if writer.can_write_eof():
            writer.write_eof()
    return total
