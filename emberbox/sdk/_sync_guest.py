"""The blocking client's background commands, files and terminals. Mirrors
:mod:`emberbox.sdk._async_guest` call for call."""

from __future__ import annotations

import builtins
import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import IO, TYPE_CHECKING, cast

import websockets
from websockets.sync.client import ClientConnection, connect

from emberbox import errors
from emberbox.models import ErrorEvent, ExitEvent, OutputEvent
from emberbox.sdk import _guest
from emberbox.sdk._calls import CONNECT_TIMEOUT_S, CommandResult, parse, raise_for_error
from emberbox.sdk._guest import FileInfo, OutputCollector, OutputHandler, ProcessStatus

if TYPE_CHECKING:
    import httpx

    from emberbox.sdk._sync import Sandbox


class CommandHandle:
    """A command running in the background: ``commands.run(cmd, background=True)``.

    >>> server = sb.commands.run("python3 -m http.server", background=True)
    >>> server.kill()
    """

    def __init__(
        self,
        sandbox: Sandbox,
        pid: int,
        *,
        on_stdout: OutputHandler | None = None,
        on_stderr: OutputHandler | None = None,
    ) -> None:
        self.pid = pid
        self._sandbox = sandbox
        self._on_stdout, self._on_stderr = on_stdout, on_stderr

    def __repr__(self) -> str:
        return f"CommandHandle(sandbox={self._sandbox.id!r}, pid={self.pid})"

    def wait(self) -> CommandResult:
        """Wait until it ends and return its result. Its output (what the sandbox kept
        of it, up to 1 MiB, then what follows) goes to the ``on_stdout``/``on_stderr``
        given to ``run`` as it comes. A non-zero exit code is not an error."""
        collector = OutputCollector(self._on_stdout, self._on_stderr)
        call = _guest.output_call(self._sandbox.id, self.pid)
        with self._sandbox._stream(call) as response:
            collect_events(response, collector)
        return collector.result()

    def status(self) -> ProcessStatus:
        """Whether it still runs and, once it ended, its ``exit_code``."""
        call = _guest.process_call(self._sandbox.id, self.pid)
        return parse(ProcessStatus, self._sandbox._request(call))

    def send_stdin(self, data: str | bytes, *, close: bool = False) -> int:
        """Write ``data`` (text is UTF-8) to its stdin; ``close`` ends its input after.
        Returns the bytes written."""
        content = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        call = _guest.stdin_call(self._sandbox.id, self.pid, content, close)
        response = self._sandbox._request(call)
        raise_for_error(response)
        return int(response.json()["written"])

    def close_stdin(self) -> None:
        """End its input (it reads end-of-file)."""
        self.send_stdin(b"", close=True)

    def signal(self, signal: str | int = "TERM") -> None:
        """Send a signal (``"TERM"``, ``"INT"``, ``9`` ...) to its process group."""
        response = self._sandbox._request(_guest.signal_call(self._sandbox.id, self.pid, signal))
        raise_for_error(response)

    def kill(self) -> None:
        """End it (SIGKILL to its process group)."""
        self.signal("KILL")


def collect_events(response: httpx.Response, collector: OutputCollector) -> None:
    """Feed an NDJSON answer's events to ``collector``, calling its handlers."""
    for line in response.iter_lines():
        if not line:
            continue
        event: OutputEvent | ExitEvent | ErrorEvent = _guest.parse_event(line)
        target = collector.feed(event)
        if target is not None:
            target[0](target[1])


class Files:
    """``sandbox.files``: files in the sandbox. Paths are the guest's (relative ones start
    at ``/``); transfers stream, so large files never sit whole in memory.

    >>> sb.files.write("/tmp/hello.txt", "hi")
    >>> sb.files.read("/tmp/hello.txt")
    b'hi'
    """

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    def read(self, path: str) -> bytes:
        """The whole file's bytes (see :meth:`download` for large ones)."""
        with self._sandbox._stream(_guest.read_call(self._sandbox.id, path)) as response:
            if _guest.is_listing(response.headers.get("content-type", "")):
                raise errors.InvalidRequest(f"{path} is a directory; use files.list()")
            return response.read()

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return self.read(path).decode(encoding)

    def write(
        self,
        path: str,
        data: str | bytes | IO[bytes] | Iterable[bytes],
        *,
        mode: int | None = None,
    ) -> int:
        """Write the file (text is UTF-8; a binary file object or an iterable of bytes is
        streamed). It replaces the old file once complete; ``mode`` defaults to the old
        file's, else 0o644. Returns the bytes written.

        >>> with open("data.bin", "rb") as f:
        ...     sb.files.write("/data/data.bin", f)
        """
        content, size = _body(data)
        call = _guest.write_call(self._sandbox.id, path, content, mode, size)
        response = self._sandbox._request(call)
        raise_for_error(response)
        return int(response.json()["size"])

    def upload(
        self, local_path: str | os.PathLike[str], path: str, *, mode: int | None = None
    ) -> int:
        """Copy the local file ``local_path`` to ``path`` in the sandbox, streamed."""
        with open(local_path, "rb") as source:
            return self.write(path, source, mode=mode)

    def download(self, path: str, local_path: str | os.PathLike[str]) -> int:
        """Copy the sandbox's file ``path`` to ``local_path``, streamed; returns its size."""
        written = 0
        with self._sandbox._stream(_guest.read_call(self._sandbox.id, path)) as response:
            if _guest.is_listing(response.headers.get("content-type", "")):
                raise errors.InvalidRequest(f"{path} is a directory; use files.download_dir()")
            with open(local_path, "wb") as target:
                for chunk in response.iter_bytes():
                    target.write(chunk)
                    written += len(chunk)
        return written

    def list(self, path: str) -> builtins.list[FileInfo]:
        """The entries of a directory, sorted by name."""
        with self._sandbox._stream(_guest.read_call(self._sandbox.id, path)) as response:
            if not _guest.is_listing(response.headers.get("content-type", "")):
                raise errors.InvalidRequest(f"{path} is not a directory")
            return _guest.parse_listing(response.read())

    def stat(self, path: str) -> FileInfo:
        """What is at ``path``: ``type`` (file, dir, symlink, other), ``size``, ``mode``."""
        return parse(FileInfo, self._sandbox._request(_guest.stat_call(self._sandbox.id, path)))

    def exists(self, path: str) -> bool:
        try:
            self.stat(path)
        except errors.NotFound:
            return False
        return True

    def remove(self, path: str, *, recursive: bool = False) -> None:
        """Remove a file or an empty directory; ``recursive`` removes a whole tree."""
        call = _guest.remove_call(self._sandbox.id, path, recursive)
        raise_for_error(self._sandbox._request(call))

    def make_dir(self, path: str, *, parents: bool = True, mode: int = 0o755) -> None:
        """Create a directory (and its missing parents, unless ``parents=False``)."""
        call = _guest.mkdir_call(self._sandbox.id, path, parents, mode)
        raise_for_error(self._sandbox._request(call))

    def upload_dir(self, local_dir: str | os.PathLike[str], path: str) -> int:
        """Copy the contents of ``local_dir`` into the directory ``path`` (made if
        missing) as one tar stream; returns how many entries were written."""
        archive, size = _guest.pack_dir(local_dir)
        with archive:
            call = _guest.tar_in_call(self._sandbox.id, path, _chunks(archive), size)
            response = self._sandbox._request(call)
        raise_for_error(response)
        return int(response.json()["entries"])

    def download_dir(self, path: str, local_dir: str | os.PathLike[str]) -> int:
        """Copy the contents of the directory ``path`` into ``local_dir`` (made if
        missing). Entries that would land outside it, links leading out of it and
        device files are refused. Returns how many entries were extracted."""
        with _guest.spool() as archive:
            with self._sandbox._stream(_guest.tar_out_call(self._sandbox.id, path)) as response:
                for chunk in response.iter_bytes():
                    archive.write(chunk)
            return _guest.unpack_into(archive, local_dir)


class Pty:
    """``sandbox.pty``: interactive terminals in the sandbox."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    def create(self, cols: int = 80, rows: int = 24, *, cmd: str | None = None) -> PtySession:
        """Open a ``cols`` x ``rows`` terminal running ``cmd`` (default: a login shell).
        Closing the session ends the program.

        >>> with sb.pty.create(100, 30) as term:
        ...     term.send("stty size; exit\\n")
        ...     print(b"".join(term).decode())
        """
        config = self._sandbox._config
        url = _guest.pty_url(config, self._sandbox.id, cols, rows, cmd)
        with contextlib.ExitStack() as stack:
            try:
                connection = stack.enter_context(
                    connect(
                        url,
                        additional_headers=_guest.pty_headers(config),
                        open_timeout=CONNECT_TIMEOUT_S,
                        max_size=None,
                    )
                )
            except (OSError, websockets.exceptions.WebSocketException) as exc:
                raise errors.HostError(f"cannot open a terminal at {config.url}: {exc}") from exc
            session = PtySession(connection)
            session._close = stack.pop_all().close  # the session closes it from now on
        return session


class PtySession:
    """An open terminal: :meth:`send` keystrokes, :meth:`recv` screen output (or iterate
    over it), :meth:`resize`, :meth:`close`. ``pid`` is its program's guest pid and,
    once it ended, ``exit_code`` its exit code."""

    def __init__(self, connection: ClientConnection) -> None:
        self._ws = connection
        self._close: Callable[[], object] = connection.close
        self.exit: ExitEvent | None = None
        started = _guest.control_frame(str(self._receive(CONNECT_TIMEOUT_S)))
        self.pid = int(started.get("pid", 0))

    @property
    def exit_code(self) -> int | None:
        return None if self.exit is None else self.exit.exit_code

    def send(self, data: str | bytes) -> None:
        """Type ``data`` (text is UTF-8) into the terminal."""
        self._send(data.encode("utf-8") if isinstance(data, str) else bytes(data))

    def resize(self, cols: int, rows: int) -> None:
        """Tell the program the terminal is now ``cols`` x ``rows`` (SIGWINCH)."""
        self._send(_guest.resize_frame(cols, rows))

    def _send(self, message: str | bytes) -> None:
        try:
            self._ws.send(message)
        except websockets.exceptions.ConnectionClosed as exc:
            raise _guest.closed_error(exc) from None

    def recv(self, timeout_s: float | None = None) -> bytes:
        """The next chunk of screen output; ``b""`` once the program has ended. Raises
        TimeoutError after ``timeout_s`` seconds without output."""
        while self.exit is None:
            message = self._receive(timeout_s)
            if isinstance(message, bytes):
                return message
            event = _guest.control_frame(message)
            if event.get("type") == "exit":
                self.exit = ExitEvent.model_validate(event)
        return b""

    def wait(self, timeout_s: float | None = None) -> int | None:
        """Read (and drop) output until the program ends; returns its exit code."""
        while self.recv(timeout_s):
            pass
        return self.exit_code

    def close(self) -> None:
        """Close the terminal; a program still running is killed."""
        self._close()

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.recv():
            yield chunk

    def __enter__(self) -> PtySession:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _receive(self, timeout_s: float | None) -> str | bytes:
        try:
            return self._ws.recv(timeout=timeout_s)
        except websockets.exceptions.ConnectionClosed as exc:
            raise _guest.closed_error(exc) from None


def _body(
    data: str | bytes | IO[bytes] | Iterable[bytes],
) -> tuple[bytes | Iterable[bytes], int | None]:
    """What httpx sends, and its size when known (a Content-Length: checked up front)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    if isinstance(data, bytes):
        return data, len(data)
    if hasattr(data, "read"):
        source = cast(IO[bytes], data)
        return _chunks(source), _guest.file_size(source)
    return data, None


def _chunks(source: IO[bytes]) -> Iterator[bytes]:
    while chunk := source.read(_guest.CHUNK_SIZE):
        yield chunk
