"""Saving and loading a QEMU VM's state through QMP migration to and from a plain file.

Templates: the template's RAM lives in a shared file (``memory-backend-file,share=on``)
and is left out of the stream with the ``x-ignore-shared`` capability, so the state file
is under a megabyte; each clone maps the RAM file privately (copy-on-write) and loads
only the device state. Other snapshots carry the whole RAM in the stream.

The file travels as a file descriptor (``fd:``): QEMU never opens paths or spawns
helpers for this, which keeps working under ``-sandbox spawn=deny``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any

from emberbox.errors import VMMError
from emberbox.vmm.qemu.qmp import QMPClient

# QEMU throttles migration to 32 MiB/s by default; to a local file we want all of it.
MAX_BANDWIDTH = 1 << 40
POLL_S = 0.005
# A clone's device state loads in ~4 ms: polled at POLL_S, the wait rounded up to 10.
LOAD_POLL_S = 0.0005
_ENDED = {"completed", "failed", "cancelled"}


async def set_ignore_shared(qmp: QMPClient, enabled: bool) -> None:
    await qmp.execute(
        "migrate-set-capabilities",
        capabilities=[{"capability": "x-ignore-shared", "state": enabled}],
    )


async def save(qmp: QMPClient, dest: Path, *, ignore_shared: bool, timeout_s: float) -> int:
    """Write the (stopped) VM's state to the new file ``dest``; its size in bytes.

    A failed save (disk full, QEMU error) removes the partial file and raises VMMError.
    """
    await set_ignore_shared(qmp, ignore_shared)
    await qmp.execute("migrate-set-parameters", **{"max-bandwidth": MAX_BANDWIDTH})
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        await qmp.send_fd("emberbox-save", fd)
        os.close(fd)
        fd = -1
        await qmp.execute("migrate", uri="fd:emberbox-save")
        status = await _wait_done(qmp, timeout_s)
        if status.get("status") != "completed":
            raise VMMError(f"saving VM state to {dest} failed: {status.get('error-desc', status)}")
        return await asyncio.to_thread(_fsync, dest)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(dest)
        raise


async def load(qmp: QMPClient, fd_number: int, *, timeout_s: float) -> None:
    """:func:`load_state`, then run the guest."""
    await load_state(qmp, fd_number, timeout_s=timeout_s)
    await run(qmp)


async def load_state(qmp: QMPClient, fd_number: int, *, timeout_s: float) -> None:
    """Feed the state on QEMU's inherited ``fd_number`` to a ``-incoming defer`` QEMU
    (``x-ignore-shared`` already set as its snapshot needs: :func:`set_ignore_shared`)
    and wait until it is loaded; a state saved stopped stays paused."""
    await qmp.execute("migrate-incoming", uri=f"fd:{fd_number}")
    status = await _wait_done(qmp, timeout_s, LOAD_POLL_S)
    if status.get("status") != "completed":
        raise VMMError(f"loading VM state failed: {status.get('error-desc', status)}")


async def running(qmp: QMPClient) -> bool:
    return bool((await qmp.execute("query-status")).get("running"))


async def run(qmp: QMPClient) -> None:
    """Run a loaded guest (a state saved stopped would stay paused)."""
    if not await running(qmp):
        await qmp.execute("cont")


async def _wait_done(qmp: QMPClient, timeout_s: float, poll_s: float = POLL_S) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        status: dict[str, Any] = await qmp.execute("query-migrate") or {}
        if status.get("status") in _ENDED:
            return status
        if loop.time() > deadline:
            await qmp.execute("migrate_cancel")
            raise VMMError(f"VM state transfer did not finish within {timeout_s:g} s")
        await asyncio.sleep(poll_s)


def _fsync(path: Path) -> int:
    """Flush ``path`` to disk; its size."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)
