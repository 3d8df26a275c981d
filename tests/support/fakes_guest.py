"""An in-memory stand-in for a sandbox's guest agent: its commands, files and background
processes, with the calls of :class:`emberbox.agent_client.calls.AgentCalls`.

Paths resolve as the guest would (relative to ``/``, ``..`` collapsed); there are no
symlinks. ``exec`` echoes its stdin, then says ``ran CMD in NAME`` on stdout and ``err``
on stderr (exit code 3 when the command says ``fail``). Processes: ``cat`` (and any
process on a terminal) echoes its stdin until it is closed; ``sleep ...`` runs until
signalled; anything else prints ``ran CMD`` on stdout and ``err`` on stderr and exits at
once (3 when the command says ``fail``). A terminal's program ends at Ctrl-D (exit code
0) or at input ``exit N``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import io
import itertools
import posixpath
import tarfile
import time
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio

from emberbox import errors
from emberbox.agent_client.answers import ExecResult, FileInfo, ProcessInfo, ProcessStatus
from emberbox.agent_client.calls import OutputCallback, StartCallback
from emberbox.agent_client.spec import ExecSpec, SpawnSpec

if TYPE_CHECKING:
    from emberbox.agent_client.calls import AgentCalls, ByteTunnel

CHUNK = 64 * 1024
SIGNALS = {"TERM": 15, "KILL": 9, "INT": 2, "HUP": 1}


def _norm(path: str) -> str:
    return posixpath.normpath(posixpath.join("/", path))


@dataclass
class FakeProcess:
    pid: int
    cmd: str
    pty: tuple[int, int] | None
    env: dict[str, str]
    output: list[tuple[str, bytes]] = field(default_factory=list)
    running: bool = True
    exit_code: int | None = None
    signal: int | None = None
    stdin_open: bool = True
    changed: anyio.Event = field(default_factory=anyio.Event)
    started: float = field(default_factory=time.time)

    def emit(self, stream: str, data: bytes) -> None:
        self.output.append((stream, data))
        self._notify()

    def end(self, exit_code: int | None, signal: int | None = None) -> None:
        if self.running:
            self.running, self.exit_code, self.signal = False, exit_code, signal
            self._notify()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    def status(self) -> ProcessStatus:
        return ProcessStatus(
            pid=self.pid,
            running=self.running,
            exit_code=self.exit_code,
            signal=self.signal,
            duration_ms=None if self.running else 12.5,
            timed_out=False,
            output_truncated=False,
            memory_limited=False,
        )


def command_text(cmd: Sequence[str] | str) -> str:
    """A command as one line: a shell line as is, an argv joined by spaces."""
    return cmd if isinstance(cmd, str) else " ".join(cmd)


async def deliver(callback: OutputCallback | None, data: bytes) -> None:
    """Hand ``data`` to an output callback, awaiting it when it is a coroutine function."""
    outcome = callback(data) if callback is not None else None
    if inspect.isawaitable(outcome):
        await outcome


class FakeGuest:
    """One sandbox's guest agent (``name`` shows in what ``exec`` prints)."""

    def __init__(self, name: str = "fake-guest") -> None:
        self.name = name
        self.files: dict[str, bytes] = {}
        self.modes: dict[str, int] = {}
        self.dirs: set[str] = {"/", "/tmp", "/etc"}
        self.files["/etc/hostname"] = b"fake-guest\n"
        self.processes: dict[int, FakeProcess] = {}
        self.resizes: list[tuple[int, int, int]] = []
        self.signals: list[tuple[int, str | int]] = []
        self.calls: list[str] = []
        self.ports: dict[int, int] = {}  # guest port -> a port on 127.0.0.1 of the host
        self._pids = itertools.count(100)

    async def exec(
        self,
        spec: ExecSpec,
        *,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> ExecResult:
        text = command_text(spec.cmd)
        stdout = (spec.stdin or b"") + f"ran {text} in {self.name}\n".encode()
        exit_code = 3 if "fail" in text else 0
        await deliver(on_stdout, stdout)
        await deliver(on_stderr, b"err\xff\n")
        return ExecResult(exit_code, stdout, b"err\xff\n", duration_ms=1.5)

    # -- processes ---------------------------------------------------------------------

    async def spawn(self, spec: SpawnSpec) -> int:
        text, pty = command_text(spec.cmd), spec.pty
        process = FakeProcess(next(self._pids), text, pty, dict(spec.env))
        self.processes[process.pid] = process
        if pty is None and text != "cat" and not text.startswith("sleep"):
            process.emit("stdout", f"ran {text}\n".encode())
            process.emit("stderr", b"err\xff\n")
            process.end(3 if "fail" in text else 0)
        return process.pid

    def _process(self, pid: int) -> FakeProcess:
        try:
            return self.processes[pid]
        except KeyError:
            raise errors.NotFound(f"no process {pid}") from None

    async def start(
        self,
        spec: SpawnSpec,
        on_start: StartCallback,
        *,
        close_stdin: bool = False,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> ProcessStatus:
        pid = await self.spawn(spec)
        await on_start(pid)
        process = self._process(pid)
        if close_stdin and spec.pty is None:
            process.stdin_open = False
        return await self.attach(pid, on_stdout=on_stdout, on_stderr=on_stderr)

    async def attach(
        self,
        pid: int,
        *,
        from_start: bool = True,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> ProcessStatus:
        process = self._process(pid)
        sent = 0 if from_start else len(process.output)
        while True:
            changed = process.changed
            while sent < len(process.output):
                stream, data = process.output[sent]
                sent += 1
                await deliver(on_stdout if stream == "stdout" or process.pty else on_stderr, data)
            if not process.running:
                return process.status()
            await changed.wait()

    async def write_stdin(
        self, pid: int, data: bytes | AsyncIterable[bytes], *, close: bool = False
    ) -> int:
        process = self._process(pid)
        if not process.running or not process.stdin_open:
            raise errors.Conflict(f"process {pid} has no open stdin")
        written = 0
        chunks = [data] if isinstance(data, bytes) else [c async for c in data]
        for chunk in chunks:
            written += len(chunk)
            if chunk:
                process.emit("stdout", chunk)
            if process.pty is not None and (b"\x04" in chunk or chunk.startswith(b"exit ")):
                process.end(int(chunk.split()[1]) if chunk.startswith(b"exit ") else 0)
        if close:
            process.stdin_open = False
            process.end(0)
        return written

    async def signal(self, pid: int, sig: str | int, *, group: bool = True) -> None:
        process = self._process(pid)
        self.signals.append((pid, sig))
        if not process.running:
            raise errors.Conflict(f"process {pid} has already exited")
        number = sig if isinstance(sig, int) else SIGNALS[sig]
        process.end(128 + number, number)  # as the agent reports it

    async def resize(self, pid: int, cols: int, rows: int) -> None:
        process = self._process(pid)
        if process.pty is None:
            raise errors.Conflict(f"process {pid} has no terminal")
        process.pty = (cols, rows)
        self.resizes.append((pid, cols, rows))

    async def wait(self, pid: int, timeout_s: float | None = None) -> ProcessStatus:
        process = self._process(pid)
        if timeout_s:
            with anyio.move_on_after(timeout_s):
                while process.running:
                    await process.changed.wait()
        return process.status()

    async def ps(self) -> list[ProcessInfo]:
        return [
            ProcessInfo(
                pid=p.pid,
                cmd=p.cmd,
                running=p.running,
                exit_code=p.exit_code,
                pty=p.pty is not None,
                started_at=p.started,
            )
            for p in self.processes.values()
        ]

    async def forget(self, pid: int) -> None:
        if self._process(pid).running:
            raise errors.Conflict(f"process {pid} is still running")
        del self.processes[pid]

    # -- files -------------------------------------------------------------------------

    def _info(self, path: str) -> FileInfo:
        name = posixpath.basename(path) or "/"
        if path in self.dirs:
            return FileInfo(name, path, "dir", 4096, 0o755, 1.0)
        if path in self.files:
            mode = self.modes.get(path, 0o644)
            return FileInfo(name, path, "file", len(self.files[path]), mode, 1.0)
        raise errors.NotFound(f"No such file or directory: {path!r}")

    def _parent_dir(self, path: str) -> None:
        if posixpath.dirname(path) not in self.dirs:
            raise errors.NotFound(f"No such file or directory: {path!r}")

    async def stat(self, path: str) -> FileInfo:
        return self._info(_norm(path))

    async def list_dir(self, path: str) -> list[FileInfo]:
        path = _norm(path)
        if self._info(path).type != "dir":
            raise errors.InvalidRequest(f"Not a directory: {path!r}")
        children = {
            p for p in (*self.files, *self.dirs) if p != "/" and posixpath.dirname(p) == path
        }
        return [self._info(child) for child in sorted(children)]

    async def read_file(
        self, path: str, *, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        path = _norm(path)
        if self._info(path).type == "dir":
            raise errors.InvalidRequest(f"Is a directory: {path!r}")
        data = self.files[path][offset : None if length is None else offset + length]
        for start in range(0, len(data), CHUNK):
            yield data[start : start + CHUNK]

    async def write_file(
        self,
        path: str,
        data: bytes | AsyncIterable[bytes],
        *,
        mode: int = 0o644,
        offset: int = 0,
        truncate: bool = True,
    ) -> int:
        path = _norm(path)
        self.calls.append(f"write {path}")
        self._parent_dir(path)
        if path in self.dirs:
            raise errors.InvalidRequest(f"Is a directory: {path!r}")
        body = data if isinstance(data, bytes) else b"".join([c async for c in data])
        if path not in self.files:
            self.modes[path] = mode
        self.files[path] = body
        return len(body)

    async def make_dir(self, path: str, *, parents: bool = True, mode: int = 0o755) -> None:
        path = _norm(path)
        if path in self.files:
            raise errors.InvalidRequest(f"File exists: {path!r}")
        if not parents:
            self._parent_dir(path)
        while path not in self.dirs:
            self.dirs.add(path)
            path = posixpath.dirname(path)

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        path = _norm(path)
        self.calls.append(f"remove {path}")
        info = self._info(path)
        inside = [p for p in (*self.files, *self.dirs) if p.startswith(path + "/")]
        if info.type == "dir" and inside and not recursive:
            raise errors.InvalidRequest(f"Directory not empty: {path!r}")
        for p in [path, *inside]:
            self.files.pop(p, None)
            self.dirs.discard(p)

    async def rename(self, src: str, dst: str) -> None:
        src, dst = _norm(src), _norm(dst)
        self.calls.append(f"rename {src} {dst}")
        self._info(src)
        self._parent_dir(dst)
        self.files[dst] = self.files.pop(src)
        self.modes[dst] = self.modes.pop(src, 0o644)

    async def tar_out(self, path: str) -> AsyncIterator[bytes]:
        root = _norm(path)
        self._info(root)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for name in sorted(p for p in self.dirs if p.startswith(root + "/")):
                member = tarfile.TarInfo(posixpath.relpath(name, root))
                member.type, member.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(member)
            for name in sorted(p for p in self.files if p.startswith(root + "/")):
                member = tarfile.TarInfo(posixpath.relpath(name, root))
                member.size = len(self.files[name])
                tar.addfile(member, io.BytesIO(self.files[name]))
        yield buffer.getvalue()

    async def tar_in(self, path: str, data: AsyncIterable[bytes]) -> int:
        root = _norm(path)
        body = b"".join([chunk async for chunk in data])
        try:
            with tarfile.open(fileobj=io.BytesIO(body), mode="r:") as tar:
                members = tar.getmembers()
                for member in members:
                    if member.name.startswith("/") or ".." in member.name.split("/"):
                        raise errors.InvalidRequest(f"refused tar member {member.name!r}")
                await self.make_dir(root)
                for member in members:
                    target = posixpath.join(root, member.name)
                    if member.isdir():
                        await self.make_dir(target)
                    else:
                        extracted = tar.extractfile(member)
                        assert extracted is not None
                        await self.make_dir(posixpath.dirname(target))
                        self.files[target] = extracted.read()
        except tarfile.TarError as exc:
            raise errors.InvalidRequest(f"not a tar stream: {exc}") from exc
        return len(members)

    @contextlib.asynccontextmanager
    async def connect(self, port: int) -> AsyncIterator[FakeTunnel]:
        """A TCP connection to the host port that ``ports`` maps ``port`` to."""
        self.calls.append(f"connect {port}")
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.ports[port])
        except (KeyError, OSError):
            yield FakeTunnel(port, None, None)
            return
        try:
            yield FakeTunnel(port, reader, writer)
        finally:
            writer.close()


class FakeTunnel:
    """A tunnel of :meth:`FakeGuest.connect`: a host socket, or (unmapped port) one that
    fails as the agent's answer would."""

    def __init__(
        self, port: int, reader: asyncio.StreamReader | None, writer: asyncio.StreamWriter | None
    ) -> None:
        self.port = port
        self._reader, self._writer = reader, writer

    async def send(self, data: bytes) -> None:
        if self._writer is not None:
            self._writer.write(data)
            await self._writer.drain()

    async def send_eof(self) -> None:
        if self._writer is not None:
            self._writer.write_eof()

    async def receive(self) -> bytes:
        if self._reader is None:
            message = f"PortUnreachable: Connection refused: port {self.port}"
            raise errors.AgentRequestFailed(message, type="PortUnreachable")
        return await self._reader.read(CHUNK)


if TYPE_CHECKING:
    _fits: AgentCalls = FakeGuest()
    _tunnel_fits: ByteTunnel = FakeTunnel(1, None, None)
