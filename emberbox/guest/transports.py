"""How the agent reaches the host: the transport, and serving sessions over it.

Standard library only. Three transports: ``unix:PATH`` (``--listen``, the host-side
tests), ``vsock`` (Firecracker; a new connection replaces the old, the host having
reconnected) and ``serial`` (QEMU's virtio-serial port, reopened whenever the host goes
away). :func:`choose_transport` picks one; a :class:`Server` serves the agent over it,
one :class:`~.channel.Session` per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import socket
import time
import traceback
from collections.abc import Callable
from functools import partial
from typing import Any

from . import common, protocol
from .channel import Channel, Handler, Session

PORT_WAIT_S = 10.0
REOPEN_DELAY_S = 0.25

log = common.log


class Server:
    """Serves `handler` over a transport until cancelled. With `restart` (PID 1, which
    must not die) a failure is logged and serving starts again; otherwise it raises."""

    def __init__(self, handler: Handler, ready: dict[str, Any], *, restart: bool) -> None:
        self._handler = handler
        self._ready = ready  # the event each session opens with
        self._restart = restart

    async def serve_forever(self, transport: str) -> None:
        while True:
            try:
                await self._serve(transport)
            except Exception:
                if not self._restart:
                    raise
                log(f"serving failed, restarting: {traceback.format_exc()}")
            await asyncio.sleep(1.0)

    async def _serve(self, transport: str) -> None:
        if transport.startswith("unix:"):
            await self._serve_listener(listen_unix(transport.removeprefix("unix:")), False)
        elif transport == "vsock":
            await self._serve_listener(listen_vsock(), exclusive=True)
        else:
            await self._serve_serial()

    async def _serve_listener(self, sock: socket.socket, exclusive: bool) -> None:
        """Serves each accepted connection; `exclusive`: a new one replaces the old."""
        loop = asyncio.get_running_loop()
        sessions: set[asyncio.Task[str]] = set()
        sock.setblocking(False)
        try:
            while True:
                conn, _ = await loop.sock_accept(sock)
                if exclusive:  # the host reconnected: the old connection is dead
                    for old in sessions:
                        old.cancel()
                task = loop.create_task(self._serve_channel(conn.fileno(), conn.close, "conn"))
                sessions.add(task)
                task.add_done_callback(sessions.discard)
        finally:
            for task in sessions:
                task.cancel()
            await asyncio.gather(*sessions, return_exceptions=True)
            sock.close()

    async def _serve_serial(self) -> None:
        while True:
            path = await wait_for_port(PORT_WAIT_S)
            try:
                fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
            except OSError as exc:
                log(f"cannot open {path}: {exc}")
                await asyncio.sleep(1.0)
                continue
            # EOF means the host is not (or no longer) connected: reopen and wait for it.
            await self._serve_channel(fd, partial(os.close, fd), path)
            await asyncio.sleep(REOPEN_DELAY_S)

    async def _serve_channel(self, fd: int, closer: Callable[[], None], name: str) -> str:
        return await Session(Channel(fd, closer, name), self._handler, dict(self._ready)).run()


def choose_transport(listen: str | None) -> str:
    """--listen, else emberbox.transport= on the kernel command line, else serial."""
    if listen:
        return listen
    try:
        with open("/proc/cmdline", encoding="utf-8") as f:
            words = f.read().split()
    except OSError:
        words = []
    for word in words:
        if word.startswith("emberbox.transport="):
            value = word.partition("=")[2]
            if value in ("vsock", "serial"):
                return value
            log(f"unknown transport {value!r}, using serial")
    return "serial"


def listen_unix(path: str) -> socket.socket:
    """A listening unix socket that appears at `path` only once it accepts connections."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staging = f"{path}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(staging)
    try:
        sock.bind(staging)
        sock.listen(8)
        os.replace(staging, path)
    except OSError:
        sock.close()
        raise
    return sock


def listen_vsock() -> socket.socket:
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        sock.bind((socket.VMADDR_CID_ANY, protocol.AGENT_VSOCK_PORT))
        sock.listen(8)
    except OSError:
        sock.close()
        raise
    return sock


def find_port_device() -> str | None:
    """/dev path of the agent's virtio-serial port (devtmpfs makes the node; no udev link)."""
    for name_file in sorted(glob.glob("/sys/class/virtio-ports/*/name")):
        with contextlib.suppress(OSError), open(name_file, encoding="utf-8") as f:
            if f.read().strip() == protocol.AGENT_PORT_NAME:
                return "/dev/" + os.path.basename(os.path.dirname(name_file))
    return None


async def wait_for_port(timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while (device := find_port_device()) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no virtio-serial port named {protocol.AGENT_PORT_NAME}")
        await asyncio.sleep(0.1)
    return device
