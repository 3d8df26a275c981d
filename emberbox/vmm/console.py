"""The guest's serial console, drained from a socket into a size-capped log file.

QEMU's own file backend cannot cap a file, and a guest that writes a gigabyte to its
console must not fill the host's disk. So the console goes to a unix socket and this
reader appends at most ``max_bytes`` to ``console.log``; beyond that it keeps draining,
slowly (the guest's console is slowed, never stuck), and remembers only a rolling tail in
memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque
from pathlib import Path

TAIL_BYTES = 64 * 1024
READ_BYTES = 256 * 1024
DRAIN_BYTES_PER_S = 1 << 20  # how fast output past the cap is read (and dropped)
BATCH_S = 0.02  # pause between reads (see _drain)
CAP_NOTE = b"\n[emberbox: console log capped; later output dropped]\n"


class ConsoleLog:
    """Owns the console connection and the log file of one VM."""

    def __init__(self, socket_path: Path, log_path: Path, max_bytes: int) -> None:
        self.socket_path = socket_path
        self.log_path = log_path
        self.max_bytes = max_bytes
        self.written = 0
        self.dropped = 0
        self._tail: deque[bytes] = deque()
        self._tail_size = 0
        self._task: asyncio.Task[None] | None = None
        self._sock: socket.socket | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        with contextlib.suppress(OSError):  # the VMM went away: nothing more to log
            await self._drain()

    async def _drain(self) -> None:
        sock = await self._connect()
        if sock is None:
            return
        loop = asyncio.get_running_loop()
        with self.log_path.open("ab") as log:
            self.written = log.tell()
            while chunk := await loop.sock_recv(sock, READ_BYTES):
                self._remember(chunk)
                room = self.max_bytes - self.written
                if room > 0:
                    log.write(chunk[:room])
                    log.flush()
                    self.written += min(room, len(chunk))
                    if len(chunk) > room:
                        log.write(CAP_NOTE)
                        log.flush()
                dropped = max(0, len(chunk) - max(room, 0))
                self.dropped += dropped
                if dropped:
                    # Past the cap: the UART hands us a few bytes per write, one read
                    # each. Pausing lets them gather in the socket (and then fills it),
                    # so a guest printing forever is held back by its own console
                    # instead of costing our CPU (~1/BATCH_S reads a second).
                    await asyncio.sleep(max(BATCH_S, dropped / DRAIN_BYTES_PER_S))

    async def _connect(self) -> socket.socket | None:
        loop = asyncio.get_running_loop()
        for _ in range(200):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, str(self.socket_path))
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                await asyncio.sleep(0.01)
                continue
            except BaseException:
                sock.close()
                raise
            self._sock = sock  # the guest never reads its console: we only keep it open
            return sock
        return None

    def _remember(self, chunk: bytes) -> None:
        self._tail.append(chunk)
        self._tail_size += len(chunk)
        while self._tail_size - len(self._tail[0]) >= TAIL_BYTES:
            self._tail_size -= len(self._tail.popleft())

    def tail(self, max_bytes: int = 8192) -> str:
        """The last ``max_bytes`` of console output (from memory, else from the file)."""
        data = b"".join(self._tail)
        if not data and self.log_path.exists():
            with self.log_path.open("rb") as f:
                f.seek(max(0, self.log_path.stat().st_size - max_bytes))
                data = f.read()
        return data[-max_bytes:].decode("utf-8", "replace")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await self._task
            self._task = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
