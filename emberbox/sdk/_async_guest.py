"""The asyncio client's background commands, files and terminals. Mirrors
:mod:`emberbox.sdk._sync_guest` call for call."""

from __future__ import annotations

import builtins
import contextlib
import inspect
import os
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import IO, TYPE_CHECKING

import anyio
import anyio.to_thread
import websockets
from websockets.asyncio.client import ClientConnection, connect

from emberbox import errors
from emberbox.models import ErrorEvent, ExitEvent, OutputEvent
from emberbox.sdk import _guest
from emberbox.sdk._calls import CONNECT_TIMEOUT_S, CommandResult, parse, raise_for_error
from emberbox.sdk._guest import FileInfo, OutputCollector, OutputHandler, ProcessStatus

if TYPE_CHECKING:
    import httpx

    from emberbox.sdk._async import AsyncSandbox


class AsyncCommandHandle:
    """A command running in the background: ``commands.run(cmd, background=True)``.

    >>> server = await sb.commands.run("python3 -m http.server", background=True)
    >>> await server.kill()
    """

    def __init__(
        self,
        sandbox: AsyncSandbox,
        pid: int,
        *,
        on_stdout: OutputHandler | None = None,
        on_stderr: OutputHandler | None = None,
    ) -> None:
        self.pid = pid
        self._sandbox = sandbox
        self._on_stdout, self._on_stderr = on_stdout, on_stderr

    def __repr__(self) -> str:
        return f"AsyncCommandHandle(sandbox={self._sandbox.id!r}, pid={self.pid})"

    async def wait(self) -> CommandResult:
        """Wait until it ends and return its result. Its output (what the sandbox kept
        of it, up to 1 MiB, then what follows) goes to the ``on_stdout``/``on_stderr``
        given to ``run`` as it comes. A non-zero exit code is not an error."""
        collector = OutputCollector(self._on_stdout, self._on_stderr)
        call = _guest.output_call(self._sandbox.id, self.pid)
        async with self._sandbox._stream(call) as response:
            await collect_events(response, collector)
        return collector.result()

    async def status(self) -> ProcessStatus:
        """Whether it still runs and, once it ended, its ``exit_code``."""
        call = _guest.process_call(self._sandbox.id, self.pid)
        return parse(ProcessStatus, await self._sandbox._request(call))

    async def send_stdin(self, data: str | bytes, *, close: bool = False) -> int:
        """Write ``data`` (text is UTF-8) to its stdin; ``close`` ends its input after.
        Returns the bytes written."""
        content = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        call = _guest.stdin_call(self._sandbox.id, self.pid, content, close)
        response = await self._sandbox._request(call)
        raise_for_error(response)
        return int(response.json()["written"])

    async def close_stdin(self) -> None:
        """End its input (it reads end-of-file)."""
        await self.send_stdin(b"", close=True)

    async def signal(self, signal: str | int = "TERM") -> None:
        """Send a signal (``"TERM"``, ``"INT"``, ``9`` ...) to its process group."""
        call = _guest.signal_call(self._sandbox.id, self.pid, signal)
        raise_for_error(await self._sandbox._request(call))

    async def kill(self) -> None:
        """End it (SIGKILL to its process group)."""
        await self.signal("KILL")


async def collect_events(response: httpx.Response, collector: OutputCollector) -> None:
    """Feed an NDJSON answer's events to ``collector``, calling (awaiting) its handlers."""
    async for line in response.aiter_lines():
        if not line:
            continue
        event: OutputEvent | ExitEvent | ErrorEvent = _guest.parse_event(line)
        target = collector.feed(event)
        if target is not None:
            outcome = target[0](target[1])
            if inspect.isawaitable(outcome):
                await outcome


class AsyncFiles:
    """``sandbox.files``: files in the sandbox. Paths are the guest's (relative ones start
    at ``/``); transfers stream, so large files never sit whole in memory.

    >>> await sb.files.write("/tmp/hello.txt", "hi")
    >>> await sb.files.read("/tmp/hello.txt")
    b'hi'
    """

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox

    async def read(self, path: str) -> bytes:
        """The whole file's bytes (see :meth:`download` for large ones)."""
        async with self._sandbox._stream(_guest.read_call(self._sandbox.id, path)) as response:
            if _guest.is_listing(response.headers.get("content-type", "")):
                raise errors.InvalidRequest(f"{path} is a directory; use files.list()")
            return await response.aread()

    async def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return (await self.read(path)).decode(encoding)

    async def write(
        self,
        path: str,
        data: str | bytes | IO[bytes] | AsyncIterable[bytes],
        *,
        mode: int | None = None,
    ) -> int:
        """Write the file (text is UTF-8; a binary file object or an async iterable of
        bytes is streamed). It replaces the old file once complete; ``mode`` defaults
        to the old file's, else 0o644. Returns the bytes written.

        >>> with open("data.bin", "rb") as f:
        ...     await sb.files.write("/data/data.bin", f)
        """
        content, size = _body(data)
        call = _guest.write_call(self._sandbox.id, path, content, mode, size)
        response = await self._sandbox._request(call)
        raise_for_error(response)
        return int(response.json()["size"])

    async def upload(
        self, local_path: str | os.PathLike[str], path: str, *, mode: int | None = None
    ) -> int:
        """Copy the local file ``local_path`` to ``path`` in the sandbox, streamed."""
        with open(local_path, "rb") as source:  # noqa: ASYNC230 (read in a thread below)
            return await self.write(path, source, mode=mode)

    async def download(self, path: str, local_path: str | os.PathLike[str]) -> int:
        """Copy the sandbox's file ``path`` to ``local_path``, streamed; returns its size."""
        written = 0
        async with self._sandbox._stream(_guest.read_call(self._sandbox.id, path)) as response:
            if _guest.is_listing(response.headers.get("content-type", "")):
                raise errors.InvalidRequest(f"{path} is a directory; use files.download_dir()")
            async with await anyio.open_file(local_path, "wb") as target:
                async for chunk in response.aiter_bytes():
                    await target.write(chunk)
                    written += len(chunk)
        return written

    async def list(self, path: str) -> builtins.list[FileInfo]:
        """The entries of a directory, sorted by name."""
        async with self._sandbox._stream(_guest.read_call(self._sandbox.id, path)) as response:
            if not _guest.is_listing(response.headers.get("content-type", "")):
                raise errors.InvalidRequest(f"{path} is not a directory")
            return _guest.parse_listing(await response.aread())

    async def stat(self, path: str) -> FileInfo:
        """What is at ``path``: ``type`` (file, dir, symlink, other), ``size``, ``mode``."""
        return parse(
            FileInfo, await self._sandbox._request(_guest.stat_call(self._sandbox.id, path))
        )

    async def exists(self, path: str) -> bool:
        try:
            await self.stat(path)
        except errors.NotFound:
            return False
        return True

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        """Remove a file or an empty directory; ``recursive`` removes a whole tree."""
        call = _guest.remove_call(self._sandbox.id, path, recursive)
        raise_for_error(await self._sandbox._request(call))

    async def make_dir(self, path: str, *, parents: bool = True, mode: int = 0o755) -> None:
        """Create a directory (and its missing parents, unless ``parents=False``)."""
        call = _guest.mkdir_call(self._sandbox.id, path, parents, mode)
        raise_for_error(await self._sandbox._request(call))

    async def upload_dir(self, local_dir: str | os.PathLike[str], path: str) -> int:
        """Copy the contents of ``local_dir`` into the directory ``path`` (made if
        missing) as one tar stream; returns how many entries were written."""
        archive, size = await anyio.to_thread.run_sync(_guest.pack_dir, local_dir)
        with archive:
            call = _guest.tar_in_call(self._sandbox.id, path, _chunks(archive), size)
            response = await self._sandbox._request(call)
        raise_for_error(response)
        return int(response.json()["entries"])

    async def download_dir(self, path: str, local_dir: str | os.PathLike[str]) -> int:
        """Copy the contents of the directory ``path`` into ``local_dir`` (made if
        missing). Entries that would land outside it, links leading out of it and
        device files are refused. Returns how many entries were extracted."""
        with _guest.spool() as archive:
            call = _guest.tar_out_call(self._sandbox.id, path)
            async with self._sandbox._stream(call) as response:
                async for chunk in response.aiter_bytes():
                    await anyio.to_thread.run_sync(archive.write, chunk)
            return await anyio.to_thread.run_sync(_guest.unpack_into, archive, local_dir)


class AsyncPty:
    """``sandbox.pty``: interactive terminals in the sandbox."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox

    async def create(
        self, cols: int = 80, rows: int = 24, *, cmd: str | None = None
    ) -> AsyncPtySession:
        """Open a ``cols`` x ``rows`` terminal running ``cmd`` (default: a login shell).
        Closing the session ends the program.

        >>> async with await sb.pty.create(100, 30) as term:
        ...     await term.send("stty size; exit\\n")
        ...     print(b"".join([chunk async for chunk in term]).decode())
        """
        config = self._sandbox._config
        url = _guest.pty_url(config, self._sandbox.id, cols, rows, cmd)
        async with contextlib.AsyncExitStack() as stack:
            try:
                connection = await stack.enter_async_context(
                    connect(
                        url,
                        additional_headers=_guest.pty_headers(config),
                        open_timeout=CONNECT_TIMEOUT_S,
                        max_size=None,
                    )
                )
            except (OSError, websockets.exceptions.WebSocketException) as exc:
                raise errors.HostError(f"cannot open a terminal at {config.url}: {exc}") from exc
            session = AsyncPtySession(connection)
            await session._start()
            session._close = stack.pop_all().aclose  # the session closes it from now on
        return session


class AsyncPtySession:
    """An open terminal: :meth:`send` keystrokes, :meth:`recv` screen output (or iterate
    over it), :meth:`resize`, :meth:`close`. ``pid`` is its program's guest pid and,
    once it ended, ``exit_code`` its exit code."""

    def __init__(self, connection: ClientConnection) -> None:
        self._ws = connection
        self._close: Callable[[], Awaitable[object]] = connection.close
        self.exit: ExitEvent | None = None
        self.pid = 0

    async def _start(self) -> None:
        started = _guest.control_frame(str(await self._receive(CONNECT_TIMEOUT_S)))
        self.pid = int(started.get("pid", 0))

    @property
    def exit_code(self) -> int | None:
        return None if self.exit is None else self.exit.exit_code

    async def send(self, data: str | bytes) -> None:
        """Type ``data`` (text is UTF-8) into the terminal."""
        await self._send(data.encode("utf-8") if isinstance(data, str) else bytes(data))

    async def resize(self, cols: int, rows: int) -> None:
        """Tell the program the terminal is now ``cols`` x ``rows`` (SIGWINCH)."""
        await self._send(_guest.resize_frame(cols, rows))

    async def _send(self, message: str | bytes) -> None:
        try:
            await self._ws.send(message)
        except websockets.exceptions.ConnectionClosed as exc:
            raise _guest.closed_error(exc) from None

    async def recv(self, timeout_s: float | None = None) -> bytes:
        """The next chunk of screen output; ``b""`` once the program has ended. Raises
        TimeoutError after ``timeout_s`` seconds without output."""
        while self.exit is None:
            message = await self._receive(timeout_s)
            if isinstance(message, bytes):
                return message
            event = _guest.control_frame(message)
            if event.get("type") == "exit":
                self.exit = ExitEvent.model_validate(event)
        return b""

    async def wait(self, timeout_s: float | None = None) -> int | None:
        """Read (and drop) output until the program ends; returns its exit code."""
        while await self.recv(timeout_s):
            pass
        return self.exit_code

    async def close(self) -> None:
        """Close the terminal; a program still running is killed."""
        await self._close()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while chunk := await self.recv():
            yield chunk

    async def __aenter__(self) -> AsyncPtySession:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with anyio.CancelScope(shield=True):
            await self.close()

    async def _receive(self, timeout_s: float | None) -> str | bytes:
        try:
            with anyio.fail_after(timeout_s):
                return await self._ws.recv()
        except websockets.exceptions.ConnectionClosed as exc:
            raise _guest.closed_error(exc) from None


def _body(
    data: str | bytes | IO[bytes] | AsyncIterable[bytes],
) -> tuple[bytes | AsyncIterable[bytes], int | None]:
    """What httpx sends, and its size when known (a Content-Length: checked up front)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    if isinstance(data, bytes):
        return data, len(data)
    if isinstance(data, AsyncIterable):
        return data, None
    return _chunks(data), _guest.file_size(data)


async def _chunks(source: IO[bytes]) -> AsyncIterator[bytes]:
    while chunk := await anyio.to_thread.run_sync(source.read, _guest.CHUNK_SIZE):
        yield chunk
