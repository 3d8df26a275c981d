"""Warm runtimes and the ``warm`` and ``run`` ops (standard library only).

``warm`` starts, per runtime asked for, a process that has done its start-up already
(for ``python3`` the zygote of :mod:`.warm_zygote`), before the template snapshot is
taken: every clone of the template then holds it ready. ``run`` extracts a tar (the
program's files) and runs one command, as ``exec`` would and with the same answer
(plus ``warm``): forked from the warm runtime when the request names one that is ready
and idle and gives no stdin, else by ``exec``'s own path (the request carries the full
``exec`` fields for that). Both paths share the cgroup (``limits``), the timeout, the
output sink (cap and flow control) and the result fields, so a caller cannot tell
them apart but by ``warm`` and the time taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from . import archive, cgroups, commands, common, fdio, protocol
from .channel import Call

READY_TIMEOUT_S = 120.0  # a zygote's imports under TCG
INLINE_EXTRACT_MAX = 64 * 1024  # smaller tars are extracted on the loop (a thread costs more)
RUNTIMES = ("python3",)
ZYGOTE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "warm_zygote.py")


@dataclass(frozen=True)
class WarmProgram:
    """The ``warm`` field of a ``run`` request: what to run in the warm runtime."""

    runtime: str
    script: str
    args: list[str]
    uid: int | None
    gid: int | None


def parse_warm(req: dict[str, Any]) -> WarmProgram | None:
    value = req.get("warm")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise common.BadRequest("'warm' must be an object or null")
    runtime, script = common.opt(value, "runtime", str), common.opt(value, "script", str)
    args = value.get("args") or []
    if not runtime or not script:
        raise common.BadRequest("'warm' needs 'runtime' and 'script'")
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise common.BadRequest("'warm.args' must be a list of strings")
    uid, gid = common.opt_count(value, "uid"), common.opt_count(value, "gid")
    return WarmProgram(runtime, script, args, uid, gid)


def zygote_request(cmd: commands.Command, program: WarmProgram) -> dict[str, Any]:
    """The message a zygote gets: the program, its cwd, identity and whole environment."""
    return {
        "script": program.script,
        "args": program.args,
        "cwd": cmd.cwd or "/",
        "uid": program.uid,
        "gid": program.gid,
        "env": {**commands.DEFAULT_ENV, **cmd.env},
    }


def fits(cmd: commands.Command, stdin: bytes | None) -> bool:
    """Whether the warm runtime can give the command what it asks for: no stdin, no
    variable that changes how the interpreter starts."""
    return not stdin and not any(name.startswith("PYTHON") for name in cmd.env)


class StatusLines:
    """Parses the zygote's ``pid N`` / ``status S`` lines from the run's status pipe."""

    def __init__(self) -> None:
        self._buf = b""
        loop = asyncio.get_running_loop()
        self.pid: asyncio.Future[int | None] = loop.create_future()
        self.status: asyncio.Future[int | None] = loop.create_future()

    def feed(self, data: bytes) -> None:
        self._buf += data
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            word, _, value = line.decode("ascii", "replace").partition(" ")
            if word == "pid" and not self.pid.done():
                self.pid.set_result(int(value))
            elif word == "status" and not self.status.done():
                self.status.set_result(int(value))
            elif word == "error" and not self.pid.done():
                self.pid.set_result(None)

    def ended(self) -> None:
        """End of file: whatever was not said never will be."""
        for future in (self.pid, self.status):
            if not future.done():
                future.set_result(None)


class Zygote:
    """One warm runtime process and the agent's end of its socket."""

    def __init__(self, popen: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self.popen = popen
        self.sock = sock
        self.exited: asyncio.Future[int] | None = None
        self.busy = False

    @property
    def usable(self) -> bool:
        return not self.busy and self.exited is not None and not self.exited.done()

    def close(self) -> None:
        self.sock.close()
        commands.killpg(self.popen.pid)


class WarmRuntimes:
    """The agent's warm runtimes by name, and the two ops that use them."""

    def __init__(self, reaper: commands.Reaper, cgroups_: cgroups.Cgroups) -> None:
        self._reaper = reaper
        self._cgroups = cgroups_
        self._zygotes: dict[str, Zygote] = {}

    async def warm(self, req: dict[str, Any], call: Call) -> dict[str, Any]:
        names = req.get("runtimes") or []
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise common.BadRequest("'runtimes' must be a list of strings")
        started, unavailable = [], {}
        for name in names:
            try:
                await self._start(name)
                started.append(name)
            except (OSError, RuntimeError, TimeoutError) as exc:
                unavailable[name] = str(exc) or type(exc).__name__
        return {"ok": True, "runtimes": started, "unavailable": unavailable}

    async def _start(self, name: str) -> None:
        found = self._zygotes.get(name)
        if found is not None and found.usable:
            return
        if name != "python3":
            raise RuntimeError(f"no warm runtime for {name!r} (there is one for python3)")
        popen, ours = _spawn_zygote()
        zygote = Zygote(popen, ours)
        zygote.exited = self._reaper.watch(popen.pid)  # before any await
        loop = asyncio.get_running_loop()
        try:
            answer = await asyncio.wait_for(loop.sock_recv(ours, 64), READY_TIMEOUT_S)
        except BaseException:
            zygote.close()
            raise
        if answer != b"ready":
            zygote.close()
            raise RuntimeError(f"{name} did not start (it said {answer!r})")
        ours.setblocking(True)
        self._zygotes[name] = zygote

    async def run(self, req: dict[str, Any], call: Call) -> dict[str, Any]:
        cmd, stdin = commands.parse_command(req), common.opt_b64(req, "stdin")
        program = parse_warm(req)
        files = common.opt_b64(req, "tar")
        if files is not None:
            dest = common.guest_path(req, "tar_dir")
            if len(files) <= INLINE_EXTRACT_MAX:  # a program's few files: no thread
                _extract(files, dest)
            else:
                await asyncio.to_thread(_extract, files, dest)
        zygote = None if program is None else self._zygotes.get(program.runtime)
        if program is not None and zygote is not None and zygote.usable and fits(cmd, stdin):
            answer = await self._run_warm(zygote, cmd, program, call)
            if answer is not None:
                return {**answer, "warm": True}
        runner = commands.ExecRunner(self._reaper, self._cgroups, call.congested)
        return {**await runner.run(req, call.emit), "warm": False}

    async def _run_warm(
        self, zygote: Zygote, cmd: commands.Command, program: WarmProgram, call: Call
    ) -> dict[str, Any] | None:
        """The run forked from ``zygote``; None if the zygote could not fork it (nothing ran)."""
        if cmd.cwd is not None and not os.path.isdir(cmd.cwd):  # noqa: ASYNC240 (one stat)
            raise common.BadRequest(f"cwd {cmd.cwd!r} does not exist or is not a directory")
        sink = commands.OutputSink(call.emit, cmd.output_max_bytes)
        group = None if cmd.limits is None else self._cgroups.create(cmd.limits)
        zygote.busy = True
        try:
            return await WarmRun(zygote, sink, group, call.congested).run(
                zygote_request(cmd, program), cmd.timeout_s
            )
        finally:
            zygote.busy = False
            if group is not None:
                await group.remove()

    def close(self) -> None:
        for zygote in self._zygotes.values():
            zygote.close()
        self._zygotes.clear()


def _spawn_zygote() -> tuple[subprocess.Popen[bytes], socket.socket]:
    """The python3 zygote, started in its own session, and our end of its socket."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        popen = subprocess.Popen(
            ["python3", ZYGOTE, str(theirs.fileno())],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=None,  # the agent's: its log (the console), for the zygote's own errors
            env=dict(commands.DEFAULT_ENV),
            cwd="/",
            start_new_session=True,
            pass_fds=(theirs.fileno(),),
        )
    except OSError:
        ours.close()
        raise
    finally:
        theirs.close()
    return popen, ours


def _extract(data: bytes, dest: str) -> int:
    os.makedirs(dest, 0o755, exist_ok=True)
    return archive.extract(io.BytesIO(data), dest)


class WarmRun:
    """One program forked from a zygote: its pipes, its status, its timeout."""

    def __init__(
        self,
        zygote: Zygote,
        sink: commands.OutputSink,
        group: cgroups.Group | None,
        congested: Callable[[], bool],
    ) -> None:
        self._zygote, self._sink, self._group = zygote, sink, group
        self._congested = congested
        self._fds: list[int] = []  # ours, closed at the end

    async def run(self, request: dict[str, Any], timeout_s: float | None) -> dict[str, Any] | None:
        lines = StatusLines()
        readers: list[fdio.PipeReader] = []
        child = None
        try:
            try:
                self._send(request)
            except OSError as exc:  # e.g. a request too big for one message: nothing ran
                common.log(f"warm run not sent: {exc}")
                return None
            out, err, status_pipe = self._fds
            started = time.monotonic()
            status_reader = fdio.PipeReader(status_pipe, lines.feed, _never)
            status_reader.done.add_done_callback(lambda _: lines.ended())
            write = self._sink.write
            readers = [
                fdio.PipeReader(out, partial(write, protocol.Kind.STDOUT), self._congested),
                fdio.PipeReader(err, partial(write, protocol.Kind.STDERR), self._congested),
                status_reader,
            ]
            child = await lines.pid
            if child is None:
                return None
            status, timed_out = await _wait(child, lines.status, timeout_s)
            duration_ms = (time.monotonic() - started) * 1000
            commands.killpg(child)  # background children must not hold the pipes open
            await asyncio.wait([r.done for r in readers[:2]], timeout=commands.OUTPUT_GRACE_S)
        finally:
            if child is not None:
                commands.killpg(child)
            for reader in readers:
                reader.stop()
            for fd in self._fds:
                os.close(fd)
        code, signo = commands.exit_code(status)
        return commands.result(
            code, signo, duration_ms, timed_out, self._sink.truncated, self._group
        )

    def _send(self, request: dict[str, Any]) -> None:
        """Sends the request with the child's fds; keeps the read ends of its pipes."""
        theirs: list[int] = []
        try:
            theirs.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            for _ in range(3):  # stdout, stderr, status
                read, write = os.pipe()
                self._fds.append(read)
                theirs.append(write)
            if self._group is not None:
                procs = os.path.join(self._group.path, "cgroup.procs")
                theirs.append(os.open(procs, os.O_WRONLY | os.O_CLOEXEC))
            payload = json.dumps(request, separators=(",", ":")).encode()
            socket.send_fds(self._zygote.sock, [payload], theirs)
        finally:
            for fd in theirs:
                os.close(fd)


async def _wait(
    child: int, status: asyncio.Future[int | None], timeout_s: float | None
) -> tuple[int, bool]:
    """The child's wait status and whether it was killed for its timeout (like
    :func:`commands.wait_exit`); a zygote that died meanwhile counts as a SIGKILL."""
    done, _ = await asyncio.wait([status], timeout=timeout_s)
    timed_out = not done
    if timed_out:
        commands.killpg(child)
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    found = await status
    return (signal.SIGKILL if found is None else found), timed_out


def _never() -> bool:
    return False


__all__ = ["RUNTIMES", "WarmProgram", "WarmRuntimes", "fits", "parse_warm", "zygote_request"]
