"""A tenant's disk for saved VMs (snapshots and paused sandboxes), weighed in bytes.

``tenant_max_snapshots`` counts saved VMs; a saved VM of a big sandbox weighs its RAM
plus its disk, so sixteen of them can fill the host. :class:`DiskQuota` reserves a
save's estimated size (guest RAM + the sandbox's work dir as it stands) before the save
writes a byte, against what the tenant holds already (its snapshots' recorded sizes and
its paused sandboxes' directories) plus the reservations of saves still running; the
reservation is given back when the save ends, written or failed. Past the limit:
403 QuotaExceeded ``tenant_max_snapshot_bytes``. The built-in tenant has no quota.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.to_thread

from emberbox import errors
from emberbox.service.sandboxes.state import SandboxState
from emberbox.service.snapshots import records
from emberbox.store import SandboxRow, Store

MIB = 1 << 20


def estimate_bytes(memory_mib: int, work_dir: Path | None) -> int:
    """(Blocking) what saving a sandbox writes, at most: its RAM and its disk as now."""
    disk = records.disk_usage(work_dir) if work_dir is not None and work_dir.is_dir() else 0
    return memory_mib * MIB + disk


def check_disk(limit: int, held: int, wanted: int) -> None:
    """QuotaExceeded when ``held`` + ``wanted`` bytes pass ``limit``."""
    if held + wanted > limit:
        raise errors.QuotaExceeded(
            f"tenant quota tenant_max_snapshot_bytes={limit} exceeded: the tenant's "
            f"snapshots and paused sandboxes hold {held} bytes and this one needs about "
            f"{wanted} more; delete a snapshot or kill a paused sandbox first",
            quota="tenant_max_snapshot_bytes",
            limit=limit,
            used=held,
        )


class DiskQuota:
    """Reservations by tenant id, checked and taken under one lock."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._reserved: dict[str, int] = {}
        self._lock = anyio.Lock()

    def reserved(self, tenant_id: str) -> int:
        return self._reserved.get(tenant_id, 0)

    @asynccontextmanager
    async def reserve(self, store: Store, row: SandboxRow) -> AsyncIterator[int]:
        """Hold the estimated size of saving ``row`` for its tenant while the ``with``
        runs (QuotaExceeded at once when it does not fit); yields the estimate."""
        tenant = row.tenant_id
        wanted = await anyio.to_thread.run_sync(estimate_bytes, row.memory_mib, row.work_dir)
        async with self._lock:
            held = await self._held(store, tenant) + self.reserved(tenant)
            check_disk(self.limit_bytes, held, wanted)
            self._reserved[tenant] = self.reserved(tenant) + wanted
        try:
            yield wanted
        finally:
            left = self.reserved(tenant) - wanted
            if left > 0:
                self._reserved[tenant] = left
            else:
                self._reserved.pop(tenant, None)

    async def _held(self, store: Store, tenant_id: str) -> int:
        snaps = await store.list_snapshots(tenant_id=tenant_id)
        paused = await store.list(states={SandboxState.PAUSED}, tenant_id=tenant_id)
        dirs = [row.paused_dir for row in paused if row.paused_dir is not None]
        on_disk = await anyio.to_thread.run_sync(
            lambda: sum(records.disk_usage(d) for d in dirs if d.is_dir())
        )
        return sum(snap.size_bytes for snap in snaps) + on_disk
