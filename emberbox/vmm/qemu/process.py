"""The QEMU process's life on the host: death with its owner, reaping, and the janitor
that cleans up after an owner killed without warning."""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
import threading
from pathlib import Path

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the parent thread ends."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def reap_in_background(popen: subprocess.Popen[bytes]) -> None:
    """Let a released child run on; a daemon thread reaps it whenever it ends."""
    threading.Thread(target=popen.wait, name=f"reap-{popen.pid}", daemon=True).start()


async def wait_for_exit(pid: int) -> None:
    """Wait until ``pid`` ends, without polling (a pidfd turns readable at exit)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[None] = loop.create_future()

    def on_exit() -> None:
        if not ended.done():
            ended.set_result(None)

    loop.add_reader(fd, on_exit)
    try:
        await ended
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def spawn_janitor(
    pid: int, work_dir: Path, cgroup_dirs: tuple[Path, ...] = ()
) -> subprocess.Popen[bytes]:
    """A tiny watcher that removes an ephemeral VM if its owner dies without cleaning up.

    It blocks reading a pipe only we hold open; when our process ends for any reason
    (even SIGKILL) the read returns, and it kills QEMU and deletes the work dir and the
    VM's (by then empty) host cgroups.
    """
    script = (
        'cat >/dev/null; kill -9 "$1" 2>/dev/null; sleep 0.2; rm -rf -- "$2"; shift 2; '
        'for d in "$@"; do rmdir -- "$d" 2>/dev/null || { sleep 0.2; rmdir -- "$d"; }; done'
    )
    return subprocess.Popen(
        [
            *("/bin/sh", "-c", script, "emberbox-janitor", str(pid), str(work_dir)),
            *map(str, cgroup_dirs),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
