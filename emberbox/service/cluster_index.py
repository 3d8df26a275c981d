"""The API replica's index of the cluster's sandboxes and snapshots (docs/cluster.md).

In cluster mode each host's own server is the truth about its VMs; the shared store
(PostgreSQL) holds one row per sandbox and snapshot with its owner and its ``host``, so
that any replica can check ownership, enforce tenant quotas, list, and find the host a
request goes to. Rows are written from the hosts' answers (:meth:`SandboxIndex.record`);
the hosts' own env, paths and pids are never copied here.

Tenant quotas are checked here, before the create is sent to a host (the hosts see only
the replica's admin key). The check and the insert are not one transaction (the host
picks the id in between): concurrent creates of one tenant on several replicas may pass
the limit by the number in flight.
"""

from __future__ import annotations

import builtins
from collections.abc import Collection, Mapping
from dataclasses import replace
from pathlib import Path

from emberbox import errors
from emberbox.config import Settings
from emberbox.models import SandboxPublic, SnapshotPublic
from emberbox.service.sandboxes.reserved import public_metadata
from emberbox.service.sandboxes.state import LIVE_STATES
from emberbox.service.tenancy import quotas
from emberbox.service.tenancy.access import Tenancy
from emberbox.store import LOCAL_TENANT_ID, SandboxRow, SnapshotRow, Store, hosts, tenants, utcnow

#: The path column of a snapshot row: the files are on its host, not here.
REMOTE_PATH = Path("/nonexistent/on-host")
_LIVE = frozenset(state.value for state in LIVE_STATES)
_FORKS_IN_USE = ("creating", "running", "paused", "stopping", "lost")


class SandboxIndex:
    """Rows of the shared store, through the tenancy service's connection."""

    def __init__(self, settings: Settings, tenancy: Tenancy) -> None:
        self._settings = settings
        self._tenancy = tenancy

    async def _store(self) -> Store:
        return await self._tenancy.store()

    # -- sandboxes ---------------------------------------------------------------------

    async def sandbox(self, sandbox_id: str) -> SandboxRow:
        """The row of ``sandbox_id``; NotFound (as for an unknown id) without one."""
        row = await (await self._store()).get(sandbox_id)
        if row is None:
            raise errors.NotFound(f"no sandbox {sandbox_id}", sandbox_id=sandbox_id)
        return row

    async def check_quota(self, tenant_id: str, vcpus: int, memory_mib: int) -> None:
        """QuotaExceeded when the tenant cannot hold one more sandbox of this shape
        (nothing for the built-in tenant: the operator's)."""
        if tenant_id == LOCAL_TENANT_ID:
            return
        store = await self._store()
        tenant = await store.call(lambda conn: tenants.get_tenant(conn, tenant_id))
        limits = quotas.limits_for(self._settings, tenant)
        if limits is not None:
            usage = await store.call(lambda conn: tenants.usage(conn, tenant_id, _LIVE))
            quotas.check_sandbox(limits, usage, vcpus, memory_mib)

    async def check_snapshot_quota(self, tenant_id: str) -> None:
        """QuotaExceeded when the tenant holds max_snapshots saved VMs already."""
        if tenant_id == LOCAL_TENANT_ID:
            return
        store = await self._store()
        tenant = await store.call(lambda conn: tenants.get_tenant(conn, tenant_id))
        limits = quotas.limits_for(self._settings, tenant)
        if limits is not None:
            usage = await store.call(lambda conn: tenants.usage(conn, tenant_id, _LIVE))
            quotas.check_snapshot(limits, usage)

    async def record(self, info: SandboxPublic, *, host: str, tenant_id: str) -> SandboxRow:
        """Index a sandbox a host created (its answer ``info``) for ``tenant_id``."""
        row = SandboxRow(
            id=info.id,
            state=info.state,
            image=info.image,
            vcpus=info.vcpus,
            memory_mib=info.memory_mib,
            timeout_s=info.timeout_s,
            created_at=info.created_at,
            expires_at=info.expires_at,
            updated_at=utcnow(),
            metadata=dict(info.metadata),
            ip_address=info.ip_address,
            error=info.error,
            snapshot_id=info.snapshot_id,
            tenant_id=tenant_id,
            host=host,
        )
        return await (await self._store()).insert(row)

    async def refresh(self, info: SandboxPublic) -> None:
        """Bring a row in step with its host's newer answer (state, deadline, address);
        a row gone meanwhile is left gone."""
        store = await self._store()
        try:
            await store.update(
                info.id,
                state=info.state,
                timeout_s=info.timeout_s,
                expires_at=info.expires_at,
                ip_address=info.ip_address,
                error=info.error,
            )
        except errors.NotFound:
            return

    async def set_state(self, sandbox_id: str, state: str) -> None:
        try:
            await (await self._store()).update(sandbox_id, state=state)
        except errors.NotFound:
            return

    async def list(
        self,
        *,
        states: Collection[str] | None = None,
        metadata: Mapping[str, str] | None = None,
        tenant_id: str | None = None,
    ) -> builtins.list[SandboxRow]:
        store = await self._store()
        return await store.list(states=states, metadata=metadata, tenant_id=tenant_id)

    async def live_count(self) -> int:
        return await (await self._store()).count(states=_LIVE)

    async def live_by_host(self) -> dict[str, int]:
        """Live sandboxes per host, as the index (shared by every replica) has them:
        ahead of the hosts' own counts, which placement reads about once a second."""
        store = await self._store()
        return await store.call(lambda conn: hosts.count_by_host(conn, _LIVE))

    # -- snapshots -----------------------------------------------------------------------

    async def snapshot(self, snapshot_id: str) -> SnapshotRow:
        """The row of ``snapshot_id``; NotFound without one."""
        row = await (await self._store()).get_snapshot(snapshot_id)
        if row is None:
            raise errors.NotFound(f"no snapshot {snapshot_id}", snapshot_id=snapshot_id)
        return row

    async def record_snapshot(
        self, info: SnapshotPublic, *, host: str, tenant_id: str
    ) -> SnapshotRow:
        """Index a snapshot a host took (its answer ``info``)."""
        row = SnapshotRow(
            id=info.id,
            sandbox_id=info.sandbox_id,
            image=info.image,
            vcpus=info.vcpus,
            memory_mib=info.memory_mib,
            vmm="",
            vmm_version="",
            size_bytes=info.size_bytes,
            created_at=info.created_at,
            path=REMOTE_PATH,
            tenant_id=tenant_id,
            host=host,
        )
        return await (await self._store()).insert_snapshot(row)

    async def forget_snapshot(self, snapshot_id: str) -> None:
        """Drop the row of a snapshot its host deleted. The host checked its forks; the
        index checks the same ones (a fork it still calls lost keeps the row)."""
        store = await self._store()
        try:
            await store.delete_snapshot(snapshot_id, unless_used_in=_FORKS_IN_USE)
        except (errors.NotFound, errors.Conflict):
            return

    async def snapshots(
        self, sandbox_id: str | None = None, *, tenant_id: str | None = None
    ) -> builtins.list[SnapshotRow]:
        return await (await self._store()).list_snapshots(sandbox_id, tenant_id=tenant_id)


def with_host_down(row: SandboxRow) -> SandboxRow:
    """The row as a tenant sees it while its host does not answer: ``lost`` unless it
    had ended already."""
    if row.state in ("stopped", "error"):
        return row
    return replace(row, state="lost")


def differs(row: SandboxRow, info: SandboxPublic) -> bool:
    """Whether a host's answer says more than the index row (worth a write)."""
    return (row.state, row.expires_at, row.timeout_s, row.ip_address, row.error) != (
        info.state,
        info.expires_at,
        info.timeout_s,
        info.ip_address,
        info.error,
    )


def sandbox_public(row: SandboxRow) -> SandboxPublic:
    """An index row as the API describes a sandbox (never its host)."""
    return SandboxPublic.model_validate(
        {
            "id": row.id,
            "state": row.state,
            "image": row.image,
            "vcpus": row.vcpus,
            "memory_mib": row.memory_mib,
            "timeout_s": row.timeout_s,
            "created_at": row.created_at,
            "expires_at": row.expires_at,
            "ip_address": row.ip_address,
            "metadata": public_metadata(row.metadata),
            "error": row.error,
            "snapshot_id": row.snapshot_id,
        }
    )


def snapshot_public(row: SnapshotRow) -> SnapshotPublic:
    """An index row as the API describes a snapshot (never its host)."""
    return SnapshotPublic(
        id=row.id,
        sandbox_id=row.sandbox_id,
        image=row.image,
        vcpus=row.vcpus,
        memory_mib=row.memory_mib,
        size_bytes=row.size_bytes,
        created_at=row.created_at,
    )
