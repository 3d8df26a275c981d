"""The QEMU process's life on the host: death with its owner, reaping, and the janitor
that cleans up after an owner killed without warning."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

PR_SET_PDEATHSIG = 1
PR_SET_THP_DISABLE = 41
PR_GET_THP_DISABLE = 42


def die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the parent thread ends."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@contextlib.contextmanager
def without_huge_pages() -> Iterator[None]:
    """Processes started inside the block get no transparent huge pages.

    The flag belongs to this process's memory and a child inherits it through fork
    (or vfork) and exec, so it is set around the spawn and cleared again (unless it
    was set before). A template clone gains nothing from huge pages (its guest RAM is a
    file mapping) and loses the rounding up of QEMU's anonymous memory (the TCG
    translation cache, the heap) to 2 MiB pages: about 2.5 MiB per idle clone.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0) != 0:  # already off (or unknown)
        yield
        return
    if libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0:
        yield
        return
    try:
        yield
    finally:
        libc.prctl(PR_SET_THP_DISABLE, 0, 0, 0, 0)


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
