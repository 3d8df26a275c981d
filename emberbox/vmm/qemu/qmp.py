"""A small QMP (QEMU Machine Protocol) client over the VM's private unix socket."""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Any

from emberbox.errors import VMMError


class QMPClient:
    """One QMP session: greeting, ``qmp_capabilities``, then commands one at a time.

    Asynchronous events (``STOP``, ``MIGRATION`` …) are kept in ``events`` so callers
    that wait for one can look.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._lock = asyncio.Lock()
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def connect(cls, path: Path, timeout_s: float = 10.0) -> QMPClient:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 24)
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                if loop.time() > deadline:
                    raise VMMError(f"QMP socket {path} not available: {exc}") from exc
                await asyncio.sleep(0.01)
        client = cls(reader, writer)
        try:
            await asyncio.wait_for(client._handshake(), timeout_s)
        except (TimeoutError, OSError, ValueError) as exc:
            await client.aclose()
            raise VMMError(f"QMP handshake on {path} failed: {exc!r}") from exc
        return client

    async def _handshake(self) -> None:
        greeting = await self._read_message()
        if "QMP" not in greeting:
            raise VMMError(f"unexpected QMP greeting: {greeting}")
        await self.execute("qmp_capabilities")

    async def _read_message(self) -> dict[str, Any]:
        try:
            line = await self._reader.readline()
        except OSError as exc:  # QEMU exited under us
            raise VMMError(f"QMP connection lost: {exc}") from exc
        if not line:
            raise VMMError("QMP connection closed")
        message: dict[str, Any] = json.loads(line)
        return message

    async def execute(self, command: str, **arguments: Any) -> Any:
        """Run one command; its ``return`` value, or VMMError with QEMU's description."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        async with self._lock:
            try:
                self._writer.write(json.dumps(request).encode() + b"\n")
                await self._writer.drain()
            except OSError as exc:
                raise VMMError(f"QMP connection lost: {exc}") from exc
            return await self._reply(command)

    async def _reply(self, command: str) -> Any:
        """The answer to the command just sent (call holding the lock); events seen on
        the way are kept."""
        while True:
            message = await self._read_message()
            if "event" in message:
                self.events.append(message)
                continue
            if "error" in message:
                desc = message["error"].get("desc", message["error"])
                raise VMMError(f"QMP {command} failed: {desc}")
            return message.get("return")

    async def send_fd(self, name: str, fd: int) -> None:
        """Hand QEMU a copy of ``fd`` under ``name`` (QMP ``getfd``, SCM_RIGHTS).

        Migration then writes to ``fd:NAME`` without QEMU spawning anything, which a
        ``-sandbox spawn=deny`` QEMU could not do for an ``exec:`` URI.
        """
        request = json.dumps({"execute": "getfd", "arguments": {"fdname": name}}).encode()
        async with self._lock:
            await self._writer.drain()
            transport_sock = self._writer.get_extra_info("socket")
            # A private socket object over a duplicate of the connection's fd: sendmsg on
            # the transport's own socket is not allowed from asyncio code.
            with socket.socket(fileno=os.dup(transport_sock.fileno())) as sock:
                rights = array.array("i", [fd])
                sock.sendmsg([request + b"\n"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
            await self._reply("getfd")

    async def wait_event(self, name: str, timeout_s: float) -> dict[str, Any]:
        """Wait for the next event called ``name`` (events seen earlier count)."""
        async with asyncio.timeout(timeout_s):
            while True:
                for event in self.events:
                    if event.get("event") == name:
                        self.events.remove(event)
                        return event
                async with self._lock:
                    message = await self._read_message()
                if "event" in message:
                    self.events.append(message)

    async def aclose(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()
