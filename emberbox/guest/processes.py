"""Background processes: ``spawn`` and the ops that follow one (standard library only).

A spawned process runs in its own session, on pipes or a PTY, and outlives the request
that started it. The agent reads its output all the time into an :class:`OutputRing`
(the newest ``output_max_bytes``), so the process never blocks on output, and each
``attach`` follows the ring from its own offset. A supervising task per process waits
for its end, enforces its timeout and releases its pipes and cgroup.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import termios
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import cgroups, commands, common, fdio, protocol
from .channel import Call

DEFAULT_OUTPUT_MAX_BYTES = 1 << 20
MAX_PTY_CELLS = 0xFFFF  # the kernel's winsize fields are u16
STDOUT, STDERR = protocol.Kind.STDOUT, protocol.Kind.STDERR


class OutputRing:
    """A process's output chunks, at most `cap` bytes, the oldest dropped first.

    Offsets count every byte the process ever wrote, so a reader that fell behind
    resumes at the oldest byte still kept.
    """

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._chunks: deque[tuple[protocol.Kind, bytes]] = deque()
        self.start = self.end = 0  # offsets of the first kept byte and past the last
        self.truncated = False
        self.closed = False
        self.changed = asyncio.Event()  # replaced by a fresh one on every change

    def append(self, kind: protocol.Kind, data: bytes) -> None:
        self._chunks.append((kind, data))
        self.end += len(data)
        while self.end - self.start > self._cap:
            self.truncated = True
            first_kind, first = self._chunks.popleft()
            excess = self.end - self.start - self._cap
            if len(first) > excess:
                self._chunks.appendleft((first_kind, first[excess:]))
                self.start += excess
            else:
                self.start += len(first)
        self._notify()

    def since(self, offset: int) -> tuple[list[tuple[protocol.Kind, bytes]], int]:
        """The chunks past `offset` (or past what was dropped), and the new offset."""
        skip, found = max(offset, self.start) - self.start, []
        for kind, data in self._chunks:
            if skip >= len(data):
                skip -= len(data)
                continue
            found.append((kind, data[skip:]))
            skip = 0
        return found, self.end

    def close(self) -> None:
        self.closed = True
        self._notify()

    def _notify(self) -> None:
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()


@dataclass(eq=False)
class Process:
    """One spawned process: what `ps`, `wait` and the other ops report and act on."""

    popen: subprocess.Popen[bytes]
    cmd: str
    pty: commands.Pty | None
    master: int | None  # the PTY's master side: output, input and window size
    ring: OutputRing
    stdin: fdio.FdWriter | None  # None once closed
    started_at: float = field(default_factory=time.time)
    started: float = field(default_factory=time.monotonic)
    exited: bool = False  # reaped: its pid may be reused, so no more signals
    status: dict[str, Any] = field(default_factory=dict)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    stdin_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def end(self, status: dict[str, Any]) -> None:
        """Records how it ended; output is complete, attached readers finish."""
        self.status = status
        self.ring.close()
        self.finished.set()

    def answer(self) -> dict[str, Any]:
        """The `wait` answer."""
        return {
            "ok": True,
            "pid": self.pid,
            "running": not self.finished.is_set(),
            "exit_code": self.status.get("exit_code"),
            "signal": self.status.get("signal"),
            "duration_ms": self.status.get("duration_ms"),
            "timed_out": self.status.get("timed_out", False),
            "output_truncated": self.ring.truncated,
            "memory_limited": self.status.get("memory_limited", False),
        }

    def info(self) -> dict[str, Any]:
        """The `ps` entry."""
        return {
            "pid": self.pid,
            "cmd": self.cmd,
            "running": not self.finished.is_set(),
            "exit_code": self.status.get("exit_code"),
            "pty": self.pty is not None,
            "started_at": self.started_at,
        }

    def close_stdin(self) -> None:
        if self.stdin is not None:
            self.stdin.close()
            self.stdin = None
        if self.popen.stdin is not None:
            self.popen.stdin.close()

    def release(self, readers: list[fdio.PipeReader]) -> None:
        """Stops reading and closes every fd it had (it has ended)."""
        for reader in readers:
            reader.stop()
        self.close_stdin()
        for pipe in (self.popen.stdout, self.popen.stderr):
            if pipe is not None:
                pipe.close()
        if self.master is not None:
            os.close(self.master)
            self.master = None


class ProcessTable:
    """The agent's spawned processes by pid, kept (ended ones too) until `forget`."""

    def __init__(self, reaper: commands.Reaper, cgroups_: cgroups.Cgroups) -> None:
        self._reaper = reaper
        self._cgroups = cgroups_
        self._procs: dict[int, Process] = {}
        self._supervisors: set[asyncio.Task[None]] = set()

    async def spawn(self, req: dict[str, Any], call: Call) -> dict[str, Any]:
        cmd, pty = commands.parse_command(req), _parse_pty(req)
        cap = DEFAULT_OUTPUT_MAX_BYTES if cmd.output_max_bytes is None else cmd.output_max_bytes
        group = None if cmd.limits is None else self._cgroups.create(cmd.limits)
        try:
            popen, master = commands.launch(cmd, stdin=subprocess.PIPE, pty=pty, group=group)
        except (OSError, common.RequestError) as exc:
            if group is not None:
                await group.remove()
            if isinstance(exc, OSError):
                raise common.os_error(exc, cmd.argv[0]) from None
            raise
        exited = self._reaper.watch(popen.pid)  # before any await: the reaper may run next
        proc, readers = self._record(popen, master, cmd, pty, cap)
        if pty is None and common.opt_bool(req, "close_stdin", False):
            proc.close_stdin()
        task = asyncio.get_running_loop().create_task(
            self._supervise(proc, readers, exited, cmd.timeout_s, group)
        )
        self._supervisors.add(task)
        task.add_done_callback(self._supervisors.discard)
        if common.opt_bool(req, "attach", False):  # FEATURE_SPAWN_ATTACH: spawn, then attach
            call.event({"event": "spawned", "pid": proc.pid})
            return await self._follow(proc, proc.ring.start, call)
        return {"ok": True, "pid": proc.pid}

    async def attach(self, req: dict[str, Any], call: Call) -> dict[str, Any]:
        proc = self._get(req)
        offset = proc.ring.start if common.opt_bool(req, "from_start", True) else proc.ring.end
        return await self._follow(proc, offset, call)

    async def _follow(self, proc: Process, offset: int, call: Call) -> dict[str, Any]:
        """Sends its output from `offset` on until it ended; then the `wait` answer."""
        while True:
            changed = proc.ring.changed
            chunks, offset = proc.ring.since(offset)
            for kind, data in chunks:
                await call.send(kind, data)
            if chunks:
                continue
            if proc.ring.closed:
                return proc.answer()
            await changed.wait()

    async def write_stdin(self, req: dict[str, Any], call: Call) -> dict[str, Any]:
        proc, close = self._get(req), common.opt_bool(req, "close", False)
        written = 0
        async with proc.stdin_lock:
            while data := await call.receive():
                await self._write(proc, data)
                written += len(data)
            if close and proc.master is not None:  # a terminal's end of file
                await self._write(proc, termios.tcgetattr(proc.master)[6][termios.VEOF])
            elif close:
                proc.close_stdin()
        return {"ok": True, "written": written}

    async def signal(self, req: dict[str, Any], call: Call) -> dict[str, Any]:
        proc, signo = self._running(req), _parse_signal(req.get("signal", "TERM"))
        try:
            if common.opt_bool(req, "group", True):
                os.killpg(proc.pid, signo)
            else:
                os.kill(proc.pid, signo)
        except ProcessLookupError:
            raise common.Clash(f"process {proc.pid} has already exited") from None
        return {"ok": True}

    async def resize(self, req: dict[str, Any], call: Call) -> dict[str, Any]:
        proc = self._running(req)
        if proc.master is None:
            raise common.Clash(f"process {proc.pid} has no PTY")
        proc.pty = _pty_size(req)
        commands.set_window_size(proc.master, proc.pty)
        commands.killpg(proc.pid, signal.SIGWINCH)
        return {"ok": True}

    async def wait(self, req: dict[str, Any], call: Call) -> dict[str, Any]:
        proc, timeout_s = self._get(req), common.opt_number(req, "timeout_s")
        if timeout_s is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.finished.wait(), timeout_s)
        return proc.answer()

    async def ps(self, req: dict[str, Any], call: Call) -> dict[str, Any]:
        return {"ok": True, "processes": [proc.info() for proc in self._procs.values()]}

    async def forget(self, req: dict[str, Any], call: Call) -> dict[str, Any]:
        proc = self._get(req)
        if not proc.finished.is_set():
            raise common.Clash(f"process {proc.pid} is still running")
        del self._procs[proc.pid]
        return {"ok": True}

    async def aclose(self) -> None:
        """Kills every running process (the agent is stopping) and waits for the cleanup."""
        for task in self._supervisors:
            task.cancel()
        await asyncio.gather(*self._supervisors, return_exceptions=True)

    def _record(
        self,
        popen: subprocess.Popen[bytes],
        master: int | None,
        cmd: commands.Command,
        pty: commands.Pty | None,
        cap: int,
    ) -> tuple[Process, list[fdio.PipeReader]]:
        ring = OutputRing(cap)
        if master is not None:
            stdin_fd = master
            readers = [fdio.PipeReader(master, _appender(ring, STDOUT), _never)]
        else:
            assert popen.stdin and popen.stdout and popen.stderr
            stdin_fd = popen.stdin.fileno()
            readers = [
                fdio.PipeReader(popen.stdout.fileno(), _appender(ring, STDOUT), _never),
                fdio.PipeReader(popen.stderr.fileno(), _appender(ring, STDERR), _never),
            ]
        proc = Process(popen, cmd.display, pty, master, ring, fdio.FdWriter(stdin_fd))
        self._procs[popen.pid] = proc
        return proc, readers

    async def _supervise(
        self,
        proc: Process,
        readers: list[fdio.PipeReader],
        exited: asyncio.Future[int],
        timeout_s: float | None,
        group: cgroups.Group | None,
    ) -> None:
        status, timed_out = None, False
        try:
            status, timed_out = await commands.wait_exit(proc.pid, exited, timeout_s)
        finally:  # also when the agent stops: leave nothing running
            proc.exited = True
            proc.popen.returncode = -signal.SIGKILL  # never Popen's own waitpid: see Reaper
            duration_ms = (time.monotonic() - proc.started) * 1000
            commands.killpg(proc.pid)  # background children must not hold the pipes open
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([r.done for r in readers], timeout=commands.OUTPUT_GRACE_S)
            proc.release(readers)
            code, signo = (137, signal.SIGKILL) if status is None else commands.exit_code(status)
            proc.end(commands.result(code, signo, duration_ms, timed_out, False, group))
            if group is not None:
                await group.remove()

    async def _write(self, proc: Process, data: bytes) -> None:
        if proc.stdin is None:
            raise common.Clash(f"stdin of process {proc.pid} is closed")
        try:
            await proc.stdin.write(data)
        except OSError as exc:
            raise common.Clash(f"cannot write to process {proc.pid}: {exc}") from None

    def _get(self, req: dict[str, Any]) -> Process:
        pid = common.count(req, "pid", 1)
        proc = self._procs.get(pid)
        if proc is None:
            raise common.Missing(f"no process {pid} (spawned ones only)")
        return proc

    def _running(self, req: dict[str, Any]) -> Process:
        proc = self._get(req)
        if proc.exited:
            raise common.Clash(f"process {proc.pid} has already exited")
        return proc


def _appender(ring: OutputRing, kind: protocol.Kind) -> Callable[[bytes], None]:
    return lambda data: ring.append(kind, data)


def _never() -> bool:
    return False


def _parse_pty(req: dict[str, Any]) -> commands.Pty | None:
    value = req.get("pty")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise common.BadRequest("'pty' must be an object {cols, rows} or null")
    return _pty_size(value)


def _pty_size(obj: dict[str, Any]) -> commands.Pty:
    cols, rows = common.count(obj, "cols", 1), common.count(obj, "rows", 1)
    if max(cols, rows) > MAX_PTY_CELLS:
        raise common.BadRequest(f"'cols' and 'rows' must be at most {MAX_PTY_CELLS}")
    return commands.Pty(cols, rows)


def _parse_signal(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < signal.NSIG:
        return value
    if isinstance(value, str):
        name = value.upper() if value.upper().startswith("SIG") else f"SIG{value.upper()}"
        with contextlib.suppress(KeyError):
            return int(signal.Signals[name])
    raise common.BadRequest(f"unknown signal {value!r}")
