"""One Prometheus scrape: the event metrics plus what is true right now (live sandboxes
by state and image, the warm pool, the VMMs' resident memory)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from emberbox.service import metrics
from emberbox.service.sandboxes.orphans import iter_processes, mentions_path
from emberbox.service.sandboxes.state import SandboxState
from emberbox.vmm.host import PROC

if TYPE_CHECKING:
    from emberbox.service.sandboxes.manager import SandboxManager

# Ended sandboxes stay in the store as history; the gauge counts those not ended.
GAUGED_STATES = (
    SandboxState.CREATING,
    SandboxState.RUNNING,
    SandboxState.PAUSED,
    SandboxState.STOPPING,
)


def vmm_resident_bytes(vms_dir: Path, proc: Path = PROC) -> int:
    """Resident memory of every process whose command line names a VM work dir."""
    total = 0
    for info in iter_processes(proc):
        if not mentions_path(info.args, vms_dir):
            continue
        try:
            status = (proc / str(info.pid) / "status").read_text()
        except OSError:
            continue  # it ended meanwhile
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
                break
    return total


async def scrape(manager: SandboxManager, vms_dir: Path) -> bytes:
    """The text of ``GET /metrics`` (``vms_dir``: where the VMMs' work dirs are)."""
    live: list[tuple[str, str]] = []
    for state in GAUGED_STATES:
        live.extend((str(r.state), r.image) for r in await manager.list(state=state))
    pool = manager.pool
    pool_sizes = {pool.shape.image: pool.ready_count()}
    rss = await anyio.to_thread.run_sync(vmm_resident_bytes, vms_dir)
    return metrics.exposition(metrics.snapshot_families(live, pool_sizes, rss))
