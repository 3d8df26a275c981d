"""The Firecracker process: spawning, adopting, waiting, and reading what it leaves.

A VM's process is either our child (:class:`Child`) or one we adopted by pid
(:class:`Adopted`: after a server restart, or forked by the jailer into a new pid
namespace); both answer :class:`VMMProcess`. Its console log grows as the guest writes,
so :func:`trim_log` keeps it bounded and :func:`read_tail` reads the end of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import os
import select
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from emberbox.errors import HostError, VMMCrashed
from emberbox.vmm.base import VMConfig
from emberbox.vmm.firecracker import jailer
from emberbox.vmm.firecracker.files import Layout
from emberbox.vmm.firecracker.jailer import JailerConfig

_PR_SET_PDEATHSIG = 1


class VMMProcess(Protocol):
    """A VMM process: our child, or one we adopted (after a restart, or the jailer's)."""

    pid: int

    def poll(self) -> int | None:
        """The exit status once it ended, else None."""
        ...

    def kill(self) -> None: ...


class Child:
    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid

    def poll(self) -> int | None:
        return self._popen.poll()  # also reaps it

    def kill(self) -> None:
        if self._popen.poll() is None:
            self._popen.kill()

    def reap_in_background(self) -> None:
        threading.Thread(target=self._popen.wait, name=f"reap-{self.pid}", daemon=True).start()


class Adopted:
    """Not our child: a pidfd tells when it ends and signals it without pid-reuse races.

    Its exit status belongs to its real parent (init), so :meth:`poll` reports -1.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fd: int | None = os.pidfd_open(pid)  # ProcessLookupError if gone already

    def poll(self) -> int | None:
        if self._fd is not None and select.select([self._fd], [], [], 0)[0]:
            os.close(self._fd)
            self._fd = None
        return -1 if self._fd is None else None

    def kill(self) -> None:
        if self.poll() is None and self._fd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._fd, signal.SIGKILL)


async def wait_exit(process: VMMProcess, timeout_s: float) -> bool:
    """Whether the process ended (and, for a child, was reaped) within ``timeout_s``."""
    # Polling works alike for children and adopted processes; 10 ms is cheap for teardown.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            while process.poll() is None:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
    return process.poll() is not None


def _die_with_parent(parent: int) -> Callable[[], None]:
    """A preexec_fn making the child receive SIGKILL when its parent dies ("ephemeral").

    The signal fires when the *thread* that forked the child exits, so spawn from the
    event loop's thread, never from a worker thread.
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork, not in the child

    def preexec() -> None:
        if prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent died before prctl: nobody would kill us
            os._exit(1)

    return preexec


def spawn(argv: list[str], cwd: Path, console: Path, die_with_parent: bool) -> Child:
    """Start ``argv`` in its own session, stdout and stderr appended to ``console``."""
    fd = os.open(console, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        popen = subprocess.Popen(
            argv,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            start_new_session=True,  # a Ctrl-C meant for the server does not reach its VMs
            preexec_fn=_die_with_parent(os.getpid()) if die_with_parent else None,
        )
    except FileNotFoundError as exc:
        raise HostError(f"cannot run {argv[0]!r}: not found", binary=argv[0]) from exc
    finally:
        os.close(fd)
    return Child(popen)


async def spawn_firecracker(
    binary: str, jail: JailerConfig | None, config: VMConfig, layout: Layout, timeout_s: float
) -> VMMProcess:
    """Start ``config``'s Firecracker, directly or through the jailer."""
    if jail is None:
        argv = [binary, "--api-sock", layout.api_socket_arg]
        return spawn(argv, layout.root, layout.console, config.lifetime == "ephemeral")
    # The jailer drops privileges, which clears the parent-death signal: a jailed VM
    # always outlives a crashed server, and teardown relies on the service's reaper.
    netns = config.extra.get("netns")
    argv = jailer.jailer_command(
        jail, config.vm_id, config.vcpus, config.memory_mib, Path(netns) if netns else None
    )
    child = spawn(argv, layout.work_dir, layout.console, die_with_parent=False)
    if not jail.new_pid_ns:
        return child  # the jailer exec'd into Firecracker: same process
    return await _adopt_from_jailer(child, layout, timeout_s)


async def _adopt_from_jailer(child: Child, layout: Layout, timeout_s: float) -> VMMProcess:
    """With --new-pid-ns the jailer forks Firecracker, records its pid and exits."""
    assert layout.jail is not None
    try:
        exited = await wait_exit(child, timeout_s)
    finally:
        child.kill()  # no-op once exited; reaps nothing else
        await wait_exit(child, 1.0)
    pid_path = jailer.pid_file(*layout.jail)
    if not exited or child.poll() != 0 or not pid_path.exists():
        tail = read_tail(layout.console, 8192)
        raise VMMCrashed(f"jailer failed (status {child.poll()}) for {layout.jail[1]}", tail)
    try:
        return Adopted(int(pid_path.read_text().strip()))
    except (ValueError, ProcessLookupError) as exc:
        raise VMMCrashed("Firecracker died right after the jailer started it") from exc


def cmdline_matches(argv: list[str], api_socket: str, jail_id: str | None = None) -> bool:
    """Whether a process's argv is the Firecracker serving ``api_socket`` (and jail id)."""
    # argv[1] too: an interpreter running a wrapper script named firecracker.
    if not any("firecracker" in Path(arg).name for arg in argv[:2]):
        return False
    if not _has_option(argv, "--api-sock", api_socket):
        return False
    return jail_id is None or _has_option(argv, "--id", jail_id)


def _has_option(argv: list[str], name: str, value: str) -> bool:
    pairs = itertools.pairwise(argv)
    return f"{name}={value}" in argv or any(a == name and b == value for a, b in pairs)


def read_tail(path: Path, max_bytes: int) -> str:
    """The last ``max_bytes`` of a file, decoded leniently; empty if there is no file."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - max_bytes))
            return f.read(max_bytes).decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def trim_log(path: Path, max_bytes: int) -> None:
    """Keep an append-only log under ``max_bytes`` by dropping its older half.

    The guest writes the console as fast as it likes; the file's writer holds it with
    O_APPEND, so after truncation its writes land at the new end. Lines written during
    the trim may be lost or reordered, acceptable for a console log.
    """
    try:
        if path.stat().st_size <= max_bytes:
            return
        with open(path, "rb") as f:
            f.seek(-(max_bytes // 2), os.SEEK_END)
            kept = f.read()
        os.truncate(path, 0)
        with open(path, "ab") as f:
            f.write(b"[... older console output trimmed ...]\n" + kept)
    except FileNotFoundError:
        pass
