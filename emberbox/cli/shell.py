"""``emberbox sandbox shell ID``: this terminal, attached to a terminal in the sandbox.

Our terminal goes into raw mode (every key goes to the sandbox, Ctrl-C included) and
back when the program ends; a resize of our window (SIGWINCH) resizes the sandbox's
terminal. When stdin is not a terminal (a pipe, a file) it is passed through as typed
input, and its end sends Ctrl-D.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import termios
import tty
from collections.abc import Iterator

from emberbox.errors import EmberboxError
from emberbox.sdk import AsyncPtySession, AsyncSandbox

END_OF_INPUT = b"\x04"  # Ctrl-D: a shell reading a terminal takes it as end of input
READ_SIZE = 4096
_RESIZE = b""  # queued on SIGWINCH (real input is never empty: its end is END_OF_INPUT)


async def run_shell(sandbox_id: str, cmd: str | None, url: str | None, api_key: str | None) -> int:
    """Attach stdin/stdout to a terminal running ``cmd`` (default: a login shell) in the
    sandbox until it ends; returns its exit status (128+N when signal N ended it)."""
    stdin_fd, stdout_fd = sys.stdin.fileno(), sys.stdout.fileno()
    cols, rows = terminal_size(stdout_fd)
    sandbox = AsyncSandbox(sandbox_id, url=url, api_key=api_key)
    try:
        async with await sandbox.pty.create(cols, rows, cmd=cmd) as term:
            with raw_mode(stdin_fd):
                await _relay(term, stdin_fd, stdout_fd)
    finally:
        await sandbox.close()
    if term.exit is None:
        return 1
    if term.exit.exit_code is not None:
        return term.exit.exit_code
    return 128 + (term.exit.signal or 0)


async def _relay(term: AsyncPtySession, stdin_fd: int, stdout_fd: int) -> None:
    loop = asyncio.get_running_loop()
    keys: asyncio.Queue[bytes] = asyncio.Queue()
    _watch_input(loop, stdin_fd, keys)
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGWINCH, keys.put_nowait, _RESIZE)
    typing = asyncio.ensure_future(_send_input(term, keys, stdout_fd))
    try:
        async for chunk in term:
            _write_all(stdout_fd, chunk)
    finally:
        typing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await typing
        loop.remove_signal_handler(signal.SIGWINCH)
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(stdin_fd)


def _watch_input(loop: asyncio.AbstractEventLoop, fd: int, keys: asyncio.Queue[bytes]) -> None:
    def readable() -> None:
        data = os.read(fd, READ_SIZE)
        keys.put_nowait(data or END_OF_INPUT)
        if not data:
            loop.remove_reader(fd)

    try:
        loop.add_reader(fd, readable)
    except PermissionError:  # a regular file: epoll cannot watch it, and it never blocks
        loop.run_in_executor(None, _read_file, loop, fd, keys)


def _read_file(loop: asyncio.AbstractEventLoop, fd: int, keys: asyncio.Queue[bytes]) -> None:
    while data := os.read(fd, READ_SIZE):
        loop.call_soon_threadsafe(keys.put_nowait, data)
    loop.call_soon_threadsafe(keys.put_nowait, END_OF_INPUT)


async def _send_input(term: AsyncPtySession, keys: asyncio.Queue[bytes], stdout_fd: int) -> None:
    """Keys and resizes to the terminal; a closed terminal is the output side's to report."""
    with contextlib.suppress(EmberboxError):
        while True:
            data = await keys.get()
            if data == _RESIZE:
                await term.resize(*terminal_size(stdout_fd))
            else:
                await term.send(data)


def terminal_size(fd: int) -> tuple[int, int]:
    """(columns, rows) of the terminal on ``fd``; 80x24 when it is not one."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return 80, 24
    return max(size.columns, 1), max(size.lines, 1)


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """Every key straight through (no echo, no line editing, no signals) while inside;
    a no-op when ``fd`` is not a terminal."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
