"""A TCP connection to a port inside the guest, over the agent's channel (``connect``).

:class:`Tunnel` is one ``connect`` request seen as a byte stream: :meth:`Tunnel.send`
writes STDIN frames within the upload window, :meth:`Tunnel.receive` takes the STDOUT
frames and acknowledges them once taken, so a slow reader on either end holds up only
its own tunnel and memory stays bounded by the window both ways (docs/protocol.md).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from emberbox import errors
from emberbox.agent_client.link import AgentLink, HostCall, checked
from emberbox.guest import protocol
from emberbox.guest.protocol import Kind, Op


class Tunnel:
    """Bytes to and from ``127.0.0.1:port`` in the guest. Made by :func:`open_tunnel`."""

    def __init__(self, link: AgentLink, call: HostCall, port: int) -> None:
        self.port = port
        self._link, self._call = link, call
        self._sent = self._acked = 0
        self._moved = asyncio.Event()
        self._data: asyncio.Queue[bytes | BaseException] = asyncio.Queue()
        self._eof_sent = False
        self.answer: dict[str, Any] | None = None
        self._pump = asyncio.get_running_loop().create_task(self._route())

    async def send(self, data: bytes) -> None:
        """Writes `data` to the guest's server, waiting while a window is in flight."""
        if self._eof_sent:
            raise errors.Conflict("the tunnel's sending side is closed")
        for i in range(0, len(data), protocol.DATA_CHUNK):
            piece = data[i : i + protocol.DATA_CHUNK]
            while self._sent - self._acked >= protocol.WINDOW and not self._pump.done():
                self._moved.clear()
                await self._moved.wait()
            if self._pump.done():
                return  # the server closed the connection: the bytes have nowhere to go
            self._sent += len(piece)
            await self._link.send(protocol.encode(Kind.STDIN, self._call.rid, piece))

    async def send_eof(self) -> None:
        """Half-closes the connection: the server reads end of file."""
        if not self._eof_sent and not self._pump.done():
            self._eof_sent = True
            await self._link.send(protocol.encode(Kind.STDIN, self._call.rid, b""))

    async def receive(self) -> bytes:
        """The server's next bytes; b"" once it closed its side. An error answer (or a
        lost channel) is raised."""
        item = await self._data.get()
        if isinstance(item, BaseException):
            self._data.put_nowait(item)  # every later call sees it too
            raise item
        if item:
            await self._call.took(len(item))
        else:
            self._data.put_nowait(item)
        return item

    async def aclose(self) -> None:
        self._pump.cancel()
        await asyncio.gather(self._pump, return_exceptions=True)

    async def _route(self) -> None:
        try:
            while True:
                frame = await self._call.next()
                if frame.kind is Kind.RESPONSE:
                    self.answer = checked(frame.json())
                    self._data.put_nowait(b"")
                    return
                if frame.kind is Kind.STDOUT and frame.payload:
                    self._data.put_nowait(frame.payload)
                elif frame.kind is Kind.EVENT:
                    self._on_event(frame.json())
        except errors.EmberboxError as exc:
            self._data.put_nowait(exc)
        finally:
            self._moved.set()

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("event") == "ack" and isinstance(event.get("bytes"), int):
            self._acked = max(self._acked, event["bytes"])
            self._moved.set()


@contextlib.asynccontextmanager
async def open_tunnel(link: AgentLink, port: int) -> AsyncIterator[Tunnel]:
    """A tunnel to ``127.0.0.1:port`` in the guest; leaving it closes the connection.

    When nothing accepts there, :meth:`Tunnel.receive` raises
    :class:`~emberbox.errors.AgentRequestFailed` with ``type`` "PortUnreachable".
    """
    async with link.open() as call:
        body = {"op": Op.CONNECT, "port": port}
        await link.send(protocol.encode_json(Kind.REQUEST, call.rid, body))
        tunnel = Tunnel(link, call, port)
        try:
            yield tunnel
        finally:
            await tunnel.aclose()
