"""The emberbox guest agent: PID 1 of a sandbox VM, running commands for the host.

Standard library only. In the guest it is installed as ``/opt/emberbox/agent.py`` next
to ``protocol.py`` and started by the initramfs as PID 1, so it also does the few duties
of an init: mount the API file systems, reap every child (orphans included) and power
the machine off on request. On the host (tests) it runs as an ordinary process with
``--listen unix:PATH`` and touches nothing global: the clock, hostname and entropy pool
are changed only when it is PID 1.

Pieces: :class:`Init` (PID 1 duties), :class:`Reaper` (SIGCHLD, pid -> status),
:class:`ExecRunner` (one command), :class:`Channel` (one byte stream to the host),
:class:`Session` (serves one channel), :class:`Agent` (requests and transports).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import ctypes
import errno
import fcntl
import glob
import os
import platform
import queue
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import IO, Any, TypeVar

try:
    from emberbox.guest import protocol
except ImportError:  # inside the guest: a standalone file next to protocol.py
    import protocol  # type: ignore[no-redef, import-not-found]

AGENT_VERSION = "0.1.0"
PROTOCOL = protocol.PROTOCOL_VERSION
DEFAULT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "xterm",
}
PORT_WAIT_S = 10.0
REOPEN_DELAY_S = 0.25
OUTPUT_GRACE_S = 2.0  # drain time for pipes held open by children that escaped the group
FLUSH_TIMEOUT_S = 5.0
BACKLOG_MAX_BYTES = 8 << 20  # pause reading a command's pipes while this much is unsent
SANDBOX_ID_FILE = "/run/emberbox/sandbox-id"
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
RB_POWER_OFF = 0x4321FEDC
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8
MOUNTS = (  # source, target, type, flags, options
    ("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
    ("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
    ("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755"),
    ("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "ptmxmode=0666,mode=0620,gid=5"),
    ("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
    ("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
    ("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"),
)
DEV_LINKS = {"fd": "", "stdin": "/0", "stdout": "/1", "stderr": "/2"}  # -> /proc/self/fd...

T = TypeVar("T")
Emit = Callable[[protocol.Kind, bytes], None]


def log(message: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        print(f"emberbox-agent: {message}", file=sys.stderr, flush=True)


class BadRequest(Exception):
    """A request the agent cannot act on; answered with error type InvalidRequest."""


# --- PID 1 duties -------------------------------------------------------------------


class Init:
    """What an init system would do for us: mounts, environment, loopback, power off."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)

    def run(self) -> None:
        os.environ.update(DEFAULT_ENV)
        for source, target, fstype, flags, options in MOUNTS:
            self._mount(source, target, fstype, flags, options)
        for name, suffix in DEV_LINKS.items():
            with contextlib.suppress(OSError):  # no udev to make them; bash's <(...) needs them
                os.symlink("/proc/self/fd" + suffix, f"/dev/{name}")
        self._loopback_up()

    def power_off(self) -> None:
        os.sync()
        self._libc.reboot(RB_POWER_OFF)
        log(f"power off failed: {os.strerror(ctypes.get_errno())}")

    def _mount(self, source: str, target: str, fstype: str, flags: int, options: str) -> None:
        if _is_mount_point(target):  # the initramfs may have moved some mounts here
            return
        with contextlib.suppress(OSError):
            os.makedirs(target, exist_ok=True)
        data = options.encode() if options else None
        rc = self._libc.mount(
            source.encode(), target.encode(), fstype.encode(), ctypes.c_ulong(flags), data
        )
        err = ctypes.get_errno()
        if rc != 0 and err != errno.EBUSY:
            log(f"mount {fstype} on {target} failed: {os.strerror(err)}")

    def _loopback_up(self) -> None:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                ifreq = fcntl.ioctl(sock, SIOCGIFFLAGS, struct.pack("16sH22x", b"lo", 0))
                flags = struct.unpack_from("16sH", ifreq)[1] | IFF_UP
                fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags))
        except OSError as exc:
            log(f"could not bring lo up: {exc}")


def _is_mount_point(target: str) -> bool:
    try:
        with open("/proc/self/mounts", encoding="utf-8") as mounts:
            return any(line.split()[1:2] == [target] for line in mounts)
    except OSError:  # /proc itself is not mounted yet
        return False


class GuestSystem:
    """The global settings a hello changes; refused (with a warning) unless PID 1."""

    def __init__(self, enabled: bool) -> None:
        self._enabled = enabled

    def apply(self, what: str, action: Callable[[], object], warnings: list[str]) -> None:
        if not self._enabled:
            warnings.append(f"{what}: skipped, the agent is not PID 1")
            return
        try:
            action()
        except (OSError, ValueError) as exc:
            warnings.append(f"{what}: {exc}")

    @staticmethod
    def add_entropy(data: bytes) -> None:
        with open("/dev/random", "wb", buffering=0) as random:
            for i in range(0, len(data), 512):  # fcntl.ioctl takes at most 1024 bytes
                chunk = data[i : i + 512]
                info = struct.pack("ii", len(chunk) * 8, len(chunk)) + chunk
                fcntl.ioctl(random, RNDADDENTROPY, info)
            fcntl.ioctl(random, RNDRESEEDCRNG)

    @staticmethod
    def write_sandbox_id(sandbox_id: str) -> None:
        os.makedirs(os.path.dirname(SANDBOX_ID_FILE), exist_ok=True)
        with open(SANDBOX_ID_FILE, "w", encoding="utf-8") as out:
            out.write(sandbox_id + "\n")


# --- processes ------------------------------------------------------------------------


class Reaper:
    """Collects every exited child on SIGCHLD and hands its status to whoever spawned it.

    One waitpid(-1) loop instead of per-process waits, because as PID 1 we also inherit
    orphans (their statuses are dropped). Nothing else may wait on our children, so
    commands are spawned with Popen and never Popen.wait()ed.
    """

    def __init__(self) -> None:
        self._waiters: dict[int, asyncio.Future[int]] = {}

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self.reap()

    def watch(self, pid: int) -> asyncio.Future[int]:
        """Call right after spawning, before yielding to the loop (which runs reap)."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters[pid] = future
        return future

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            future = self._waiters.pop(pid, None)
            if future is not None and not future.done():
                future.set_result(status)


@dataclass(frozen=True)
class ExecRequest:
    argv: list[str]
    env: dict[str, str]
    cwd: str | None
    timeout_s: float | None
    stdin: bytes | None
    output_max_bytes: int | None


class OutputSink:
    """Forwards a command's output as data frames and drops what passes the byte cap."""

    def __init__(self, emit: Emit, cap: int | None) -> None:
        self._emit = emit
        self._room = cap
        self.truncated = False

    def write(self, kind: protocol.Kind, data: bytes) -> None:
        if self._room is not None:
            if len(data) > self._room:
                data, self.truncated = data[: self._room], True
            self._room -= len(data)
        if data:
            self._emit(kind, data)


class PipeReader:
    """Reads one pipe on the loop; `done` resolves at EOF. Pauses while `congested()`."""

    def __init__(
        self, pipe: IO[bytes], on_data: Callable[[bytes], None], congested: Callable[[], bool]
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._pipe, self._fd = pipe, pipe.fileno()
        self._on_data, self._congested = on_data, congested
        self.done: asyncio.Future[None] = self._loop.create_future()
        os.set_blocking(self._fd, False)
        self._loop.add_reader(self._fd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, protocol.DATA_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        self._on_data(data)
        if self._congested():
            self._loop.remove_reader(self._fd)
            self._loop.call_later(0.02, self._resume)

    def _resume(self) -> None:
        if self._pipe.closed:
            return
        if self._congested():
            self._loop.call_later(0.02, self._resume)
        else:
            self._loop.add_reader(self._fd, self._on_readable)

    def close(self) -> None:
        if not self._pipe.closed:
            self._loop.remove_reader(self._fd)
            self._pipe.close()
        if not self.done.done():
            self.done.set_result(None)


class StdinFeeder:
    """Writes the request's stdin to the command without blocking the loop, then closes."""

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


class ExecRunner:
    """Runs one command in its own session, streams its output and returns the result."""

    def __init__(self, reaper: Reaper, congested: Callable[[], bool]) -> None:
        self._reaper = reaper
        self._congested = congested

    async def run(self, req: ExecRequest, emit: Emit) -> dict[str, Any]:
        sink = OutputSink(emit, req.output_max_bytes)
        try:
            popen = self._spawn(req)
        except OSError as exc:  # like a shell: 127 not found, 126 found but not runnable
            code = 127 if isinstance(exc, FileNotFoundError) else 126
            message = f"emberbox-agent: {req.argv[0]}: {exc.strerror or exc}\n"
            sink.write(protocol.Kind.STDERR, message.encode())
            return _result(code, None, 0.0, False, sink.truncated)
        started = time.monotonic()
        exited = self._reaper.watch(popen.pid)  # before any await: the reaper may run next
        readers = self._readers(popen, sink)
        feeder = StdinFeeder(popen.stdin, req.stdin or b"") if popen.stdin else None
        try:
            status, timed_out = await self._wait(popen.pid, exited, req.timeout_s)
            popen.returncode = os.waitstatus_to_exitcode(status)
            duration_ms = (time.monotonic() - started) * 1000
            _killpg(popen.pid)  # background children must not hold the pipes open
            await asyncio.wait([r.done for r in readers], timeout=OUTPUT_GRACE_S)
        finally:  # also on cancellation (the channel went away): leave nothing running
            _cleanup(popen, readers, feeder)
        code, signo = _exit_code(status)
        return _result(code, signo, duration_ms, timed_out, sink.truncated)

    @staticmethod
    def _spawn(req: ExecRequest) -> subprocess.Popen[bytes]:
        if req.cwd is not None and not os.path.isdir(req.cwd):
            raise BadRequest(f"cwd {req.cwd!r} does not exist or is not a directory")
        try:
            return subprocess.Popen(
                req.argv,
                stdin=subprocess.PIPE if req.stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env={**DEFAULT_ENV, **req.env},
                cwd=req.cwd,
                start_new_session=True,
                close_fds=True,
            )
        except ValueError as exc:  # e.g. an embedded NUL byte
            raise BadRequest(f"cannot run the command: {exc}") from exc

    def _readers(self, popen: subprocess.Popen[bytes], sink: OutputSink) -> list[PipeReader]:
        assert popen.stdout is not None and popen.stderr is not None
        return [
            PipeReader(popen.stdout, partial(sink.write, protocol.Kind.STDOUT), self._congested),
            PipeReader(popen.stderr, partial(sink.write, protocol.Kind.STDERR), self._congested),
        ]

    @staticmethod
    async def _wait(
        pid: int, exited: asyncio.Future[int], timeout_s: float | None
    ) -> tuple[int, bool]:
        done, _ = await asyncio.wait([exited], timeout=timeout_s)
        if done:
            return exited.result(), False
        _killpg(pid)
        return await exited, True


def _cleanup(
    popen: subprocess.Popen[bytes], readers: list[PipeReader], feeder: StdinFeeder | None
) -> None:
    _killpg(popen.pid)
    for reader in readers:
        reader.close()
    if feeder is not None:
        feeder.close()
    if popen.returncode is None:  # else Popen would waitpid() a pid that is the reaper's
        popen.returncode = -signal.SIGKILL


def _killpg(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _exit_code(status: int) -> tuple[int, int | None]:
    """Exit code as a shell reports it: 128+N when killed by signal N."""
    code = os.waitstatus_to_exitcode(status)
    return (128 - code, -code) if code < 0 else (code, None)


def _result(
    code: int, signo: int | None, duration_ms: float, timed_out: bool, truncated: bool
) -> dict[str, Any]:
    return {
        "ok": True,
        "exit_code": code,
        "signal": signo,
        "duration_ms": round(duration_ms, 3),
        "timed_out": timed_out,
        "output_truncated": truncated,
    }


# --- requests -------------------------------------------------------------------------


def _opt(req: dict[str, Any], name: str, kind: type[T]) -> T | None:
    value = req.get(name)
    if value is None:
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise BadRequest(f"{name!r} must be {kind.__name__} or null")
    return value


def _opt_b64(req: dict[str, Any], name: str) -> bytes | None:
    text = _opt(req, name, str)
    if text is None:
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"{name!r} is not valid base64: {exc}") from exc


def _opt_number(req: dict[str, Any], name: str) -> float | None:
    value = req.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise BadRequest(f"{name!r} must be a non-negative number or null")
    return float(value)


def _str_map(req: dict[str, Any], name: str) -> dict[str, str]:
    value = req.get(name) or {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise BadRequest(f"{name!r} must be an object of strings")
    return value


def parse_exec(req: dict[str, Any]) -> ExecRequest:
    argv, shell = req.get("argv"), _opt(req, "shell", str)
    if (argv is None) == (shell is None):
        raise BadRequest("exactly one of 'argv' and 'shell' must be given")
    if shell is not None:
        argv = ["/bin/sh", "-c", shell]
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise BadRequest("'argv' must be a non-empty list of strings")
    cap = _opt(req, "output_max_bytes", int)
    if cap is not None and cap < 0:
        raise BadRequest("'output_max_bytes' must not be negative")
    return ExecRequest(
        argv=argv,
        env=_str_map(req, "env"),
        cwd=_opt(req, "cwd", str),
        timeout_s=_opt_number(req, "timeout_s"),
        stdin=_opt_b64(req, "stdin"),
        output_max_bytes=cap,
    )


# --- channels -------------------------------------------------------------------------


class Channel:
    """One open byte stream to the host: nonblocking reads on the loop, writes on a thread.

    Writes go through a thread because a virtio-serial port refuses writes while no
    host is connected, and the loop must keep serving meanwhile. The channel owns `fd`
    and releases it with `closer`.
    """

    def __init__(self, fd: int, closer: Callable[[], None], name: str) -> None:
        self.name = name
        self._loop = asyncio.get_running_loop()
        self._fd, self._closer = fd, closer
        self.ended: asyncio.Future[str] = self._loop.create_future()
        self._queue: queue.SimpleQueue[bytes | asyncio.Future[None] | None] = queue.SimpleQueue()
        self._backlog, self._backlog_lock = 0, threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        self._reading = self._closed = False
        os.set_blocking(fd, False)
        self._thread = threading.Thread(target=self._write_loop, name=f"write-{name}", daemon=True)
        self._thread.start()

    def send(self, data: bytes) -> None:
        if self._closed:
            return
        with self._backlog_lock:
            self._backlog += len(data)
        self._queue.put(data)

    def congested(self) -> bool:
        return self._backlog > BACKLOG_MAX_BYTES

    async def flush(self) -> None:
        """Wait until everything sent so far is written (or FLUSH_TIMEOUT_S passed)."""
        if self._closed:
            return
        written: asyncio.Future[None] = self._loop.create_future()
        self._queue.put(written)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(written, FLUSH_TIMEOUT_S)

    def start_reading(self, on_data: Callable[[bytes], None]) -> None:
        self._loop.add_reader(self._fd, self._on_readable, on_data)
        self._reading = True

    def end(self, reason: str) -> None:
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False
        if not self.ended.done():
            self.ended.set_result(reason)

    def close(self) -> None:
        if self._closed:
            return
        self.end("closed")
        self._closed = True
        self._queue.put(None)
        os.write(self._wake_w, b"x")  # unblocks a writer waiting for the port
        self._thread.join(5.0)
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        with contextlib.suppress(OSError):
            self._closer()

    def _on_readable(self, on_data: Callable[[bytes], None]) -> None:
        try:
            data = os.read(self._fd, 64 * 1024)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.end(f"read failed: {exc}")
            return
        if not data:
            self.end("eof")
            return
        on_data(data)

    def _write_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            if isinstance(item, asyncio.Future):
                self._call_soon(partial(_resolve, item))
            elif not self._write_all(item):
                return
            else:
                with self._backlog_lock:
                    self._backlog -= len(item)

    def _write_all(self, data: bytes) -> bool:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._fd, view) :]
            except (BlockingIOError, InterruptedError):
                readable, _, _ = select.select([self._wake_r], [self._fd], [])
                if readable:  # closing
                    return False
            except OSError as exc:
                self._call_soon(partial(self.end, f"write failed: {exc}"))
                return False
        return True

    def _call_soon(self, callback: Callable[[], None]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            self._loop.call_soon_threadsafe(callback)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Session:
    """Serves one open channel until the peer disconnects or breaks the protocol."""

    def __init__(self, channel: Channel, agent: Agent) -> None:
        self._channel = channel
        self._agent = agent
        self._decoder = protocol.FrameDecoder()
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> str:
        """Returns why the session ended ("eof", "protocol violation: ...", ...)."""
        ready = {"event": "ready", "agent_version": AGENT_VERSION, "protocol": PROTOCOL}
        self._channel.send(protocol.encode_json(protocol.Kind.EVENT, 0, ready))
        self._channel.start_reading(self._on_data)
        try:
            return await self._channel.ended
        finally:  # commands of a lost connection cannot report anywhere: stop them
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._channel.close()

    def _on_data(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except protocol.ProtocolViolation as exc:
            log(f"{self._channel.name}: protocol violation, dropping the connection: {exc}")
            self._channel.end(f"protocol violation: {exc}")
            return
        for frame in frames:
            if frame.kind is protocol.Kind.REQUEST:  # nothing else is meant for us
                task = asyncio.get_running_loop().create_task(self._answer(frame))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _answer(self, frame: protocol.Frame) -> None:
        body: dict[str, Any] = {}
        try:
            body = frame.json()
            emit = partial(self._emit, frame.rid)
            reply = await self._agent.handle(body, emit, self._channel.congested)
        except BadRequest as exc:
            reply = protocol.error_payload("InvalidRequest", str(exc))
        except Exception as exc:  # a bug must not take the agent down
            log(f"request failed: {traceback.format_exc()}")
            reply = protocol.error_payload("AgentError", f"{type(exc).__name__}: {exc}")
        self._channel.send(protocol.encode_json(protocol.Kind.RESPONSE, frame.rid, reply))
        if body.get("op") == "shutdown" and reply.get("ok"):
            await self._channel.flush()
            self._agent.shutdown()

    def _emit(self, rid: int, kind: protocol.Kind, data: bytes) -> None:
        for chunk in protocol.encode_data(kind, rid, data):
            self._channel.send(chunk)


# --- the agent ------------------------------------------------------------------------


class Agent:
    """Answers requests and serves the chosen transport until shut down."""

    def __init__(self, init: Init | None, started: float) -> None:
        self._init = init
        self._started = started  # time.monotonic() when the agent process started
        self._system = GuestSystem(enabled=init is not None)
        self._reaper = Reaper()
        self._stop = asyncio.Event()

    async def run(self, transport: str) -> int:
        self._reaper.install(asyncio.get_running_loop())
        log(f"started: version {AGENT_VERSION}, pid {os.getpid()}, transport {transport}")
        serve = asyncio.create_task(self._serve_forever(transport))
        stop = asyncio.create_task(self._stop.wait())
        await asyncio.wait([serve, stop], return_when=asyncio.FIRST_COMPLETED)
        for task in (serve, stop):
            task.cancel()
        await asyncio.gather(serve, stop, return_exceptions=True)
        failed = not serve.cancelled() and serve.exception() is not None
        if failed:
            log(f"serving failed: {serve.exception()!r}")
        return 1 if failed else 0

    async def handle(
        self, req: dict[str, Any], emit: Emit, congested: Callable[[], bool]
    ) -> dict[str, Any]:
        """The answer to one request; `emit` sends its data frames as they come."""
        op = req.get("op")
        if op == "ping" or op == "shutdown":
            return {"ok": True}
        if op == "hello":
            return self._hello(req)
        if op == "exec":
            runner = ExecRunner(self._reaper, congested)
            return await runner.run(parse_exec(req), emit)
        raise BadRequest(f"unknown op {op!r}")

    def shutdown(self) -> None:
        if self._init is not None:
            self._init.power_off()  # returns only if the kernel refused
        else:
            self._stop.set()

    def _hello(self, req: dict[str, Any]) -> dict[str, Any]:
        time_ns, entropy = _opt(req, "time_ns", int), _opt_b64(req, "entropy")
        hostname, sandbox_id = _opt(req, "hostname", str), _opt(req, "sandbox_id", str)
        warnings: list[str] = []
        apply = partial(self._system.apply, warnings=warnings)
        if time_ns is not None:
            apply("set clock", partial(time.clock_settime_ns, time.CLOCK_REALTIME, time_ns))
        if entropy:
            apply("add entropy", partial(GuestSystem.add_entropy, entropy))
        if hostname is not None:
            apply("set hostname", partial(socket.sethostname, hostname))
        if sandbox_id is not None:
            apply("write sandbox id", partial(GuestSystem.write_sandbox_id, sandbox_id))
        return {
            "ok": True,
            "protocol": PROTOCOL,
            "agent_version": AGENT_VERSION,
            # From the monotonic clock, so that it follows the clock we may just have set.
            "boot_time": time.time() - (time.monotonic() - self._started),
            "kernel": platform.release(),
            "pid": os.getpid(),
            "warnings": warnings,
        }

    async def _serve_forever(self, transport: str) -> None:
        while True:
            try:
                await self._serve(transport)
            except Exception:
                if self._init is None:
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
        return await Session(Channel(fd, closer, name), self).run()


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="emberbox-agent")
    parser.add_argument("--listen", help="unix:PATH (host-side tests)")
    args = parser.parse_args(argv)
    if args.listen and not args.listen.startswith("unix:"):
        parser.error("--listen takes unix:PATH")
    started = time.monotonic()
    transport = choose_transport(args.listen)
    init = Init() if os.getpid() == 1 else None
    if init is not None:
        init.run()
    while True:
        try:
            code = asyncio.run(Agent(init, started).run(transport))
        except BaseException:  # as PID 1, exiting would panic the kernel
            if init is None:
                raise
            log(f"agent crashed, restarting: {traceback.format_exc()}")
            code = 1
        if init is None:
            return code
        time.sleep(1.0)


if __name__ == "__main__":
    raise SystemExit(main())
