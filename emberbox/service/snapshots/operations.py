"""Snapshot, pause and resume a sandbox; list and delete snapshots.

A snapshot saves a running sandbox (memory + disk) and leaves it running; new sandboxes
are forked from it by :meth:`~emberbox.service.sandboxes.manager.SandboxManager.create`. Pause
saves it to ``snapshots_dir/paused-<id>`` and ends its VMM; resume restores it there.
The records and files are :mod:`emberbox.service.snapshots.records`'.
"""

from __future__ import annotations

import secrets
from contextlib import AbstractAsyncContextManager, nullcontext
from datetime import timedelta
from pathlib import Path

import anyio
import anyio.to_thread

from emberbox import errors
from emberbox.service.sandboxes import storage
from emberbox.service.sandboxes.booting import (
    BootFlows,
    network_kwargs,
    recorded_plan,
    tenant_getter,
    usage_getter,
)
from emberbox.service.sandboxes.core import ID_BYTES, ManagerCore, not_running
from emberbox.service.sandboxes.handles import (
    ImageCatalog,
    SandboxHandle,
    SandboxRecord,
    SandboxRestorer,
)
from emberbox.service.sandboxes.state import SandboxState
from emberbox.service.snapshots import records as snapshots
from emberbox.service.snapshots.diskquota import DiskQuota
from emberbox.service.snapshots.records import SnapshotRecord
from emberbox.service.tenancy import quotas
from emberbox.store import SandboxRow, SnapshotRow, Store, utcnow
from emberbox.vmm.base import SnapshotFiles

# A snapshot's fork may still need it while the fork lives (or is paused).
_IN_USE = frozenset(
    {SandboxState.CREATING, SandboxState.RUNNING, SandboxState.PAUSED, SandboxState.STOPPING}
)


class SnapshotFlows:
    """The manager's snapshot, pause and resume (each under the sandbox's lock)."""

    def __init__(
        self,
        core: ManagerCore,
        boots: BootFlows,
        restorer: SandboxRestorer,
        images: ImageCatalog,
    ) -> None:
        self._core = core
        self._settings = core.settings
        self._boots = boots
        self._restorer = restorer
        self._images = images
        self._disk = DiskQuota(core.settings.tenant_max_snapshot_bytes)

    async def snapshot(self, sandbox_id: str) -> SnapshotRecord:
        """See :meth:`SandboxManager.snapshot`."""
        core = self._core
        store = core.open_store()
        async with core.lock(sandbox_id):
            with anyio.CancelScope(shield=True):  # a half-taken snapshot would stop the VM
                row, handle = await core.running(sandbox_id)
                # Early, before the work (the insert checks the quota again). A
                # snapshot writes a RAM dump and a disk copy: it needs room, as a pause.
                await storage.require_free_space(self._settings, "taking a snapshot")
                limits = await self._check_saved_vm_quota(store, row)
                async with self._disk_room(store, row, limits):
                    snapshot_id = "snap-" + secrets.token_hex(ID_BYTES)
                    dest = self._settings.snapshots_dir / snapshot_id
                    await anyio.to_thread.run_sync(snapshots.private_dir, dest.parent)
                    try:
                        files = await self._save(handle, dest)
                        snap = await self._snapshot_row_of(row, snapshot_id, dest, files)
                        tenant_max = None if limits is None else limits.max_snapshots
                        await store.insert_snapshot(snap, tenant_max=tenant_max)
                    except BaseException:
                        await anyio.to_thread.run_sync(snapshots.remove_tree, dest)
                        raise
        return snap

    def _disk_room(
        self, store: Store, row: SandboxRow, limits: quotas.TenantLimits | None
    ) -> AbstractAsyncContextManager[object]:
        """The tenant's disk quota reserved for saving ``row`` (none for the built-in
        tenant, which has no tenant quotas)."""
        if limits is None:
            return nullcontext()
        return self._disk.reserve(store, row)

    async def _save(self, handle: SandboxHandle, dest: Path) -> SnapshotFiles:
        limit = self._settings.snapshot_timeout_s
        try:
            with anyio.fail_after(limit):
                return await handle.snapshot(dest)
        except TimeoutError as exc:
            raise errors.VMMError(f"snapshot took longer than {limit:g} s") from exc

    async def _snapshot_row_of(
        self, row: SandboxRow, snapshot_id: str, dest: Path, files: SnapshotFiles
    ) -> SnapshotRow:
        size = await anyio.to_thread.run_sync(snapshots.disk_usage, dest)
        return SnapshotRow(
            id=snapshot_id,
            sandbox_id=row.id,
            image=row.image,
            vcpus=row.vcpus,
            memory_mib=row.memory_mib,
            vmm=files.vmm,
            vmm_version=files.vmm_version,
            size_bytes=size,
            created_at=utcnow(),
            path=dest,
            image_hash=await self.image_hash(row.image),
            tenant_id=row.tenant_id,
        )

    async def _check_saved_vm_quota(
        self, store: Store, row: SandboxRow
    ) -> quotas.TenantLimits | None:
        """QuotaExceeded when ``row``'s tenant holds max_snapshots saved VMs (snapshots
        and paused sandboxes) already; the tenant's limits (None: none apply)."""
        limits = quotas.limits_for(self._settings, await store.call(tenant_getter(row.tenant_id)))
        if limits is not None:
            quotas.check_snapshot(limits, await store.call(usage_getter(row.tenant_id)))
        return limits

    async def pause(self, sandbox_id: str) -> SandboxRecord:
        """See :meth:`SandboxManager.pause`."""
        core = self._core
        core.open_store()
        async with core.lock(sandbox_id):
            with anyio.CancelScope(shield=True):
                row, handle = await core.running(sandbox_id)
                # A paused sandbox is a saved VM on the host's disk: it counts as a
                # snapshot of its tenant, and needs the room one needs.
                await storage.require_free_space(self._settings, "pausing a sandbox")
                limits = await self._check_saved_vm_quota(core.db(), row)
                async with self._disk_room(core.db(), row, limits):
                    record = await self._pause_locked(sandbox_id, handle)
        return record

    async def _pause_locked(self, sandbox_id: str, handle: SandboxHandle) -> SandboxRecord:
        core = self._core
        dest = self._settings.snapshots_dir / f"paused-{sandbox_id}"
        await anyio.to_thread.run_sync(snapshots.private_dir, dest.parent)
        await anyio.to_thread.run_sync(snapshots.remove_tree, dest)  # a stale one
        try:
            files = await handle.snapshot(dest, stop=True)
        except errors.EmberboxError as exc:
            if not handle.is_running():  # the VMM is gone, and its state with it
                await core.mark_failed_locked(sandbox_id, f"pause failed: {exc}")
            raise
        core.live.pop(sandbox_id, None)
        await anyio.to_thread.run_sync(snapshots.write_meta, dest, files)
        return await core.move(
            sandbox_id,
            SandboxState.RUNNING,
            SandboxState.PAUSED,
            paused_dir=dest,
            vmm_pid=None,
        )

    async def resume(self, sandbox_id: str) -> SandboxRecord:
        """See :meth:`SandboxManager.resume`."""
        core = self._core
        store = core.open_store()
        async with core.lock(sandbox_id):
            with anyio.CancelScope(shield=True):
                row = await core.row(sandbox_id)
                if row.state != SandboxState.PAUSED or row.paused_dir is None:
                    raise not_running(sandbox_id, row.state, "only a paused sandbox resumes")
                files = await anyio.to_thread.run_sync(snapshots.read_meta, row.paused_dir)
                record = await self._restore_paused(store, row, files)
                await anyio.to_thread.run_sync(snapshots.remove_tree, row.paused_dir)
        return record

    async def _restore_paused(
        self, store: Store, row: SandboxRow, files: SnapshotFiles
    ) -> SandboxRecord:
        """Start ``row``'s VM from its saved state, within the quotas (lock held)."""
        core, sandbox_id = self._core, row.id
        async with core.admission:
            await self._boots.check_quota(store, row.tenant_id, row.vcpus, row.memory_mib)
            with snapshots.public_snapshot_errors(f"the saved state of sandbox {sandbox_id}"):
                handle = await self._restorer(
                    self._settings,
                    files,
                    image=row.image,
                    vcpus=row.vcpus,
                    memory_mib=row.memory_mib,
                    sandbox_id=sandbox_id,
                    lifetime="detached",
                    adopt_disk=True,
                    **network_kwargs(await recorded_plan(self._settings, sandbox_id)),
                )
            core.live[sandbox_id] = handle
            return await core.move(
                sandbox_id,
                SandboxState.PAUSED,
                SandboxState.RUNNING,
                paused_dir=None,
                vmm_pid=handle.pid,
                work_dir=handle.work_dir,
                expires_at=utcnow() + timedelta(seconds=row.timeout_s),
            )

    async def list_snapshots(
        self, sandbox_id: str | None = None, *, tenant_id: str | None = None
    ) -> list[SnapshotRecord]:
        rows = await self._core.open_store().list_snapshots(sandbox_id, tenant_id=tenant_id)
        return rows

    async def get_snapshot(self, snapshot_id: str) -> SnapshotRecord:
        self._core.open_store()
        return await self.snapshot_row(snapshot_id)

    async def delete_snapshot(self, snapshot_id: str) -> None:
        """See :meth:`SandboxManager.delete_snapshot`."""
        store = self._core.open_store()
        row = await self.snapshot_row(snapshot_id)
        await store.delete_snapshot(snapshot_id, unless_used_in=_IN_USE)
        await anyio.to_thread.run_sync(snapshots.remove_tree, row.path)

    async def image_hash(self, image: str) -> str:
        info = await anyio.to_thread.run_sync(self._images.get, image)
        return str(getattr(info, "image_hash", ""))

    async def check_image_unchanged(self, source: SnapshotRow) -> None:
        """A snapshot loads only into a VM of the image build it was made from."""
        current = await self.image_hash(source.image)
        if source.image_hash and current != source.image_hash:
            raise errors.SnapshotMismatch(
                f"snapshot {source.id} was made from an earlier build of image "
                f"{source.image!r}, which has been rebuilt since; it cannot be restored",
                snapshot_id=source.id,
            )

    async def snapshot_row(self, snapshot_id: str) -> SnapshotRow:
        row = await self._core.db().get_snapshot(snapshot_id)
        if row is None:
            raise errors.NotFound(f"no snapshot {snapshot_id}", snapshot_id=snapshot_id)
        return row
