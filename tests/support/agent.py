"""The real guest agent started on the host, for the agent's tests.

The agent runs as an ordinary process listening on a unix socket (it is not PID 1, so
it touches nothing global); it is stopped with SIGTERM first, which makes it kill the
processes it spawned, then with SIGKILL if need be.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from emberbox.agent_client.client import AgentClient
from tests.support.paths import REPO


@dataclass
class RunningAgent:
    proc: subprocess.Popen[bytes]
    socket_path: str
    workdir: str

    async def connect(self) -> AgentClient:
        return AgentClient(*await asyncio.open_unix_connection(self.socket_path))

    def open_fds(self) -> set[str]:
        """Where the agent's open file descriptors point."""
        fd_dir = f"/proc/{self.proc.pid}/fd"
        found = set()
        for fd in os.listdir(fd_dir):
            with contextlib.suppress(OSError):
                found.add(os.readlink(os.path.join(fd_dir, fd)))
        return found


@contextlib.contextmanager
def running_agent(command: list[str] | None = None, cwd: Path = REPO) -> Iterator[RunningAgent]:
    """The agent (by default the package's, run by this Python) on a fresh unix socket."""
    # Short path under /tmp: unix socket paths are limited to 107 bytes.
    workdir = tempfile.mkdtemp(prefix="eb-", dir="/tmp")
    socket_path = os.path.join(workdir, "a.sock")
    log = open(os.path.join(workdir, "agent.log"), "wb")  # noqa: SIM115 (closed below)
    command = command or [sys.executable, "-m", "emberbox.guest"]
    proc = subprocess.Popen([*command, "--listen", f"unix:{socket_path}"], stderr=log, cwd=cwd)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(socket_path):
            assert proc.poll() is None and time.monotonic() < deadline, "agent did not start"
            time.sleep(0.02)
        yield RunningAgent(proc, socket_path, workdir)
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        sys.stderr.write(Path(workdir, "agent.log").read_text())  # shown if the test failed
        shutil.rmtree(workdir)


async def chunked(data: bytes, size: int) -> AsyncIterator[bytes]:
    """`data` as an async iterable of `size`-byte chunks (the last one shorter)."""
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def collect(chunks: AsyncIterable[bytes], sizes: list[int] | None = None) -> bytes:
    """Everything an async iterable yields; each chunk's size goes to `sizes`."""
    out = bytearray()
    async for chunk in chunks:
        out += chunk
        if sizes is not None:
            sizes.append(len(chunk))
    return bytes(out)


def sha256(data: bytes) -> str:
    """The hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


async def eventually(condition: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    """Waits until `condition()` (run in a thread: it may block) holds; fails after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(condition):
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.02)
