"""Moving a command's bytes without blocking the loop (standard library only).

:class:`PipeReader` reads an fd as data comes (pausing while the channel is congested),
:class:`FdWriter` writes and waits while the pipe is full, :class:`StdinFeeder` feeds an
``exec`` its whole stdin. None of them closes the fd: its owner does, after them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from typing import IO

from . import protocol


class PipeReader:
    """Reads one fd on the loop; `done` resolves at EOF. Pauses while `congested()`.

    It never closes the fd: its owner does, after `stop()`. A PTY master reports the
    end (no slave left) as EIO, which counts as EOF like any read error.
    """

    def __init__(
        self, fd: int, on_data: Callable[[bytes], None], congested: Callable[[], bool]
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._fd, self._on_data, self._congested = fd, on_data, congested
        self._stopped = False
        self.done: asyncio.Future[None] = self._loop.create_future()
        os.set_blocking(fd, False)
        self._loop.add_reader(fd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, protocol.DATA_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.stop()
            return
        self._on_data(data)
        if self._congested():
            self._loop.remove_reader(self._fd)
            self._loop.call_later(0.02, self._resume)

    def _resume(self) -> None:
        if self._stopped:
            return
        if self._congested():
            self._loop.call_later(0.02, self._resume)
        else:
            self._loop.add_reader(self._fd, self._on_readable)

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._loop.remove_reader(self._fd)
        if not self.done.done():
            self.done.set_result(None)


class FdWriter:
    """Writes to a nonblocking fd from the loop, waiting while the pipe is full.

    `write` raises OSError (BrokenPipeError after `close()`) once the reader is gone.
    Like PipeReader it leaves closing the fd to its owner.
    """

    def __init__(self, fd: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._fd = fd
        self._closed = False
        self._waiter: asyncio.Future[None] | None = None
        os.set_blocking(fd, False)

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._closed:
                raise BrokenPipeError("closed")
            try:
                view = view[os.write(self._fd, view[: protocol.DATA_CHUNK]) :]
            except (BlockingIOError, InterruptedError):
                await self._writable()

    async def _writable(self) -> None:
        self._waiter = self._loop.create_future()
        self._loop.add_writer(self._fd, _resolve, self._waiter)
        try:
            await self._waiter
        finally:
            if not self._closed:
                self._loop.remove_writer(self._fd)
            self._waiter = None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_writer(self._fd)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(BrokenPipeError("closed"))


class StdinFeeder:
    """Writes an exec's stdin whole without blocking the loop, then closes the pipe."""

    def __init__(self, pipe: IO[bytes], data: bytes) -> None:
        self._loop = asyncio.get_running_loop()
        self._pipe, self._fd = pipe, pipe.fileno()
        self._view = memoryview(data)
        os.set_blocking(self._fd, False)
        if self._view:
            self._loop.add_writer(self._fd, self._on_writable)
        else:
            self.close()

    def _on_writable(self) -> None:
        try:
            written = os.write(self._fd, self._view[: protocol.DATA_CHUNK])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # the command closed its stdin: the rest is not wanted
            written = len(self._view)
        self._view = self._view[written:]
        if not self._view:
            self.close()

    def close(self) -> None:
        if not self._pipe.closed:
            self._loop.remove_writer(self._fd)
            with contextlib.suppress(OSError):
                self._pipe.close()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
