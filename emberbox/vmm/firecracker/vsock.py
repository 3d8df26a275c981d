"""The host side of Firecracker's vsock: the ``CONNECT``/``OK`` handshake and the connect loop.

Firecracker proxies host-initiated vsock connections through a unix socket: the host
writes ``CONNECT <port>\\n`` and Firecracker answers ``OK <host port>\\n`` once the guest
accepted. If nobody listens on that guest port, Firecracker just closes the connection.

:class:`VsockHandshake` parses the answer (pure, no I/O); :func:`connect_vsock` dials the
socket, retrying while the guest boots, and hands back an ordinary asyncio stream.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from emberbox.errors import BootTimeout, VMMCrashed
from emberbox.vmm.base import AgentStream

_ATTEMPT_S = 2.0  # one CONNECT is answered at once by a live guest; longer means a hang


class VsockRefused(Exception):
    """The handshake did not end in ``OK`` (nobody listening yet, or not Firecracker)."""


@dataclass(frozen=True)
class VsockAccepted:
    host_port: int
    leftover: bytes  # bytes after the OK line: already the guest's stream


def connect_request(port: int) -> bytes:
    if not 0 < port < 1 << 32:
        raise ValueError(f"vsock port {port} out of range")
    return f"CONNECT {port}\n".encode("ascii")


class VsockHandshake:
    """Incremental parser of Firecracker's answer to ``CONNECT``.

    Feed it what the socket returns, in pieces of any size. It answers None while the
    line is incomplete, a :class:`VsockAccepted` once ``OK <n>\\n`` arrived (with any bytes
    that followed it), and raises :class:`VsockRefused` for anything else.
    """

    MAX_LINE = 64  # "OK 4294967295\n" is 14 bytes; more without a newline is not Firecracker

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> VsockAccepted | None:
        self._buf += data
        line, sep, rest = self._buf.partition(b"\n")
        if not sep:
            if len(self._buf) > self.MAX_LINE or not b"OK ".startswith(self._buf[:3]):
                raise VsockRefused(f"unexpected answer to CONNECT: {self._buf[:80]!r}")
            return None
        words = line.split()
        if len(words) != 2 or words[0] != b"OK" or not words[1].isdigit():
            raise VsockRefused(f"unexpected answer to CONNECT: {line[:80]!r}")
        return VsockAccepted(int(words[1]), rest)

    def eof(self) -> VsockRefused:
        """The error for a connection closed before the OK line (guest not listening)."""
        got = f" after {self._buf!r}" if self._buf else ""
        return VsockRefused(f"Firecracker closed the vsock connection{got}: agent not listening")


async def connect_vsock(
    uds: Path,
    port: int,
    timeout_s: float,
    *,
    is_running: Callable[[], bool] = lambda: True,
    console_tail: Callable[[], str] = lambda: "",
) -> AgentStream:
    """A stream to guest vsock ``port`` through Firecracker's unix socket ``uds``.

    Retries with backoff while the guest is still booting (no socket yet, or Firecracker
    closing the connection because nothing listens on the port); BootTimeout after
    ``timeout_s``, VMMCrashed as soon as the process is gone.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    delay, last = 0.01, "never tried"
    while True:
        if not is_running():
            raise VMMCrashed("Firecracker exited while waiting for the guest agent", console_tail())
        try:
            async with asyncio.timeout(max(0.0, min(deadline - loop.time(), _ATTEMPT_S))):
                return await _vsock_attempt(uds, port)
        except (OSError, VsockRefused) as exc:  # TimeoutError is an OSError
            last = str(exc) or type(exc).__name__
        if loop.time() + delay >= deadline:
            raise BootTimeout(
                f"guest agent not reachable on vsock port {port} after {timeout_s:g}s: {last}",
                console_tail(),
            )
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.25)


async def _vsock_attempt(uds: Path, port: int) -> AgentStream:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, str(uds))
        await loop.sock_sendall(sock, connect_request(port))
        handshake = VsockHandshake()
        while (accepted := handshake.feed(data := await loop.sock_recv(sock, 4096))) is None:
            if not data:
                raise handshake.eof()
        # Bytes that came with the OK line are the agent's: they go first into the reader,
        # before the transport exists and can deliver anything newer.
        reader = asyncio.StreamReader()
        reader.feed_data(accepted.leftover)
        protocol = asyncio.StreamReaderProtocol(reader)
        transport, _ = await loop.create_unix_connection(lambda: protocol, sock=sock)
    except BaseException:
        sock.close()
        raise
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)
