"""Running commands in the guest: launching, reaping, and the ``exec`` op.

Standard library only. :class:`Reaper` collects every exited child (as PID 1 we also
inherit orphans), :func:`launch` starts a command in its own session (on pipes or a
PTY, in a cgroup when limited) and :class:`ExecRunner` runs one ``exec`` to its end,
its bytes moved by ``fdio``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shlex
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from . import cgroups, common, fdio, protocol, runas

DEFAULT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "xterm",
}
PTY_TERM = "xterm-256color"
OUTPUT_GRACE_S = 2.0  # drain time for pipes held open by children that escaped the group

Emit = Callable[[protocol.Kind, bytes], None]


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
class Command:
    """The fields `exec` and `spawn` share."""

    argv: list[str]
    env: dict[str, str]
    cwd: str | None
    timeout_s: float | None
    output_max_bytes: int | None
    limits: cgroups.Limits | None
    user: runas.RunAs | None = None  # None: root (the agent's own user)

    @property
    def display(self) -> str:
        """The command as a shell line (for `ps`)."""
        if self.argv[:2] == ["/bin/sh", "-c"] and len(self.argv) == 3:
            return self.argv[2]
        return shlex.join(self.argv)


def parse_command(req: dict[str, Any]) -> Command:
    argv, shell = req.get("argv"), common.opt(req, "shell", str)
    if (argv is None) == (shell is None):
        raise common.BadRequest("exactly one of 'argv' and 'shell' must be given")
    if shell is not None:
        argv = ["/bin/sh", "-c", shell]
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise common.BadRequest("'argv' must be a non-empty list of strings")
    return Command(
        argv=argv,
        env=common.str_map(req, "env"),
        cwd=common.opt(req, "cwd", str),
        timeout_s=common.opt_number(req, "timeout_s"),
        output_max_bytes=common.opt_count(req, "output_max_bytes"),
        limits=cgroups.parse_limits(req),
        user=runas.parse_user(req),
    )


@dataclass(frozen=True)
class Pty:
    cols: int
    rows: int


def set_window_size(fd: int, pty: Pty) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", pty.rows, pty.cols, 0, 0))


def launch(
    cmd: Command,
    *,
    stdin: int,
    pty: Pty | None = None,
    group: cgroups.Group | None = None,
) -> tuple[subprocess.Popen[bytes], int | None]:
    """Starts `cmd` in a new session; returns it and, with `pty`, the PTY's master fd.

    Without a PTY, stdout and stderr are pipes and `stdin` is PIPE or DEVNULL. With one,
    the child's stdio is the PTY, which becomes its controlling terminal. With
    ``cmd.user`` the child takes that identity last, just before its exec; when nothing
    else runs in the child, it is vforked by this thread as that user instead
    (``runas.as_user``). Raises OSError
    if the program cannot be run, BadRequest for a bad cwd or argument, RequestError if
    the child could not take its user's identity.
    """
    if cmd.cwd is not None and not os.path.isdir(cmd.cwd):
        raise common.BadRequest(f"cwd {cmd.cwd!r} does not exist or is not a directory")
    env = {**DEFAULT_ENV, **({"TERM": PTY_TERM} if pty else {}), **cmd.env}
    master = slave = None
    if pty is not None:
        master, slave = os.openpty()
        set_window_size(slave, pty)
    on_thread = False
    try:
        setup = _child_setup(group, slave is not None, cmd.user)
        on_thread = cmd.user is not None and setup is None and runas.thread_switch_available()
        ids = {} if cmd.user is None or group is not None or on_thread else cmd.user.popen_ids()
        with runas.as_user(cmd.user) if on_thread and cmd.user else contextlib.nullcontext():
            popen = subprocess.Popen(
                cmd.argv,
                stdin=stdin if slave is None else slave,
                stdout=subprocess.PIPE if slave is None else slave,
                stderr=subprocess.PIPE if slave is None else slave,
                env=env,
                cwd=cmd.cwd,
                start_new_session=True,
                close_fds=True,
                preexec_fn=setup,
                **ids,
            )
    except ValueError as exc:  # e.g. an embedded NUL byte
        _close(master)
        raise common.BadRequest(f"cannot run the command: {exc}") from exc
    except subprocess.SubprocessError as exc:  # the set-up in the child failed
        _close(master)
        raise common.RequestError(f"cannot start the command as {_who(cmd.user)}: {exc}") from exc
    except OSError as exc:
        _close(master)
        if on_thread and cmd.cwd is not None and exc.filename == cmd.cwd:  # its chdir, as user
            who = _who(cmd.user)
            raise common.BadRequest(f"cwd {cmd.cwd!r}: {exc.strerror} for {who}") from exc
        raise
    finally:
        _close(slave)
    return popen, master


def _child_setup(
    group: cgroups.Group | None, ctty: bool, user: runas.RunAs | None
) -> Callable[[], None] | None:
    """What the child does between fork and exec (after setsid and the dup2s). Popen
    switches the user before this runs, except with a cgroup: joining it needs root, so
    then the switch comes here, after the join. A terminal needs no privilege to become
    the controlling one (it is new), nor does no_new_privs."""
    switch = user is not None and group is not None
    prctl = runas.prctl() if user is not None and user.no_new_privs else None
    if group is None and not ctty and prctl is None:
        return None  # no Python in the child (and, without a user, Popen may use vfork)

    def setup() -> None:
        if group is not None:
            group.join()
        if ctty:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        if switch:
            assert user is not None
            user.become()
        if prctl is not None:
            runas.forbid_new_privs(prctl)

    return setup


def _who(user: runas.RunAs | None) -> str:
    return "root" if user is None else f"uid {user.uid} gid {user.gid}"


def _close(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


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


async def wait_exit(
    pid: int, exited: asyncio.Future[int], timeout_s: float | None
) -> tuple[int, bool]:
    """The wait status, and whether the process group was killed for its timeout."""
    done, _ = await asyncio.wait([exited], timeout=timeout_s)
    if done:
        return exited.result(), False
    killpg(pid)
    return await exited, True


def killpg(pgid: int, signo: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signo)


def exit_code(status: int) -> tuple[int, int | None]:
    """Exit code as a shell reports it: 128+N when killed by signal N."""
    code = os.waitstatus_to_exitcode(status)
    return (128 - code, -code) if code < 0 else (code, None)


class ExecRunner:
    """Runs one command in its own session, streams its output and returns the result."""

    def __init__(
        self, reaper: Reaper, cgroups_: cgroups.Cgroups, congested: Callable[[], bool]
    ) -> None:
        self._reaper = reaper
        self._cgroups = cgroups_
        self._congested = congested

    async def run(self, req: dict[str, Any], emit: Emit) -> dict[str, Any]:
        cmd, stdin = parse_command(req), common.opt_b64(req, "stdin")
        sink = OutputSink(emit, cmd.output_max_bytes)
        group = None if cmd.limits is None else self._cgroups.create(cmd.limits)
        try:
            return await self._run(cmd, stdin, sink, group)
        finally:
            if group is not None:
                await group.remove()

    async def _run(
        self, cmd: Command, stdin: bytes | None, sink: OutputSink, group: cgroups.Group | None
    ) -> dict[str, Any]:
        try:
            popen, _ = launch(
                cmd, stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE, group=group
            )
        except OSError as exc:  # like a shell: 127 not found, 126 found but not runnable
            code = 127 if isinstance(exc, FileNotFoundError) else 126
            message = f"emberbox-agent: {cmd.argv[0]}: {exc.strerror or exc}\n"
            sink.write(protocol.Kind.STDERR, message.encode())
            return result(code, None, 0.0, False, sink.truncated, group)
        started = time.monotonic()
        exited = self._reaper.watch(popen.pid)  # before any await: the reaper may run next
        readers = self._readers(popen, sink)
        feeder = fdio.StdinFeeder(popen.stdin, stdin or b"") if popen.stdin else None
        try:
            status, timed_out = await wait_exit(popen.pid, exited, cmd.timeout_s)
            popen.returncode = os.waitstatus_to_exitcode(status)
            duration_ms = (time.monotonic() - started) * 1000
            killpg(popen.pid)  # background children must not hold the pipes open
            await asyncio.wait([r.done for r in readers], timeout=OUTPUT_GRACE_S)
        finally:  # also on cancellation (the channel went away): leave nothing running
            _cleanup(popen, readers, feeder)
        code, signo = exit_code(status)
        return result(code, signo, duration_ms, timed_out, sink.truncated, group)

    def _readers(self, popen: subprocess.Popen[bytes], sink: OutputSink) -> list[fdio.PipeReader]:
        assert popen.stdout is not None and popen.stderr is not None
        return [
            fdio.PipeReader(
                popen.stdout.fileno(), partial(sink.write, protocol.Kind.STDOUT), self._congested
            ),
            fdio.PipeReader(
                popen.stderr.fileno(), partial(sink.write, protocol.Kind.STDERR), self._congested
            ),
        ]


def _cleanup(
    popen: subprocess.Popen[bytes],
    readers: list[fdio.PipeReader],
    feeder: fdio.StdinFeeder | None,
) -> None:
    killpg(popen.pid)
    for reader in readers:
        reader.stop()
    if feeder is not None:
        feeder.close()
    for pipe in (popen.stdout, popen.stderr):
        if pipe is not None:
            pipe.close()
    if popen.returncode is None:  # else Popen would waitpid() a pid that is the reaper's
        popen.returncode = -signal.SIGKILL


def result(
    code: int,
    signo: int | None,
    duration_ms: float,
    timed_out: bool,
    truncated: bool,
    group: cgroups.Group | None,
) -> dict[str, Any]:
    memory_limited, peak_kib = group.usage() if group is not None else (False, None)
    return {
        "ok": True,
        "exit_code": code,
        "signal": signo,
        "duration_ms": round(duration_ms, 3),
        "timed_out": timed_out,
        "output_truncated": truncated,
        "memory_limited": memory_limited,
        "peak_memory_kib": peak_kib,
    }
