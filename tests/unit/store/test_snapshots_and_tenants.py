"""Snapshot rows, and tenants (migration 3): ownership, filters, the snapshot quota and
what counts towards it."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import anyio
import pytest

from emberbox import errors
from emberbox.store import (
    LOCAL_TENANT_ID,
    SCHEMA_VERSION,
    SnapshotRow,
    Store,
    migrations,
    tenants,
    utcnow,
)
from emberbox.store.db import connect
from tests.support.rows import make_row

pytestmark = pytest.mark.anyio


def make_snapshot(snapshot_id: str, sandbox_id: str) -> SnapshotRow:
    return SnapshotRow(
        id=snapshot_id,
        sandbox_id=sandbox_id,
        image="default",
        vcpus=1,
        memory_mib=512,
        vmm="qemu",
        vmm_version="7.2.22",
        size_bytes=1234,
        created_at=utcnow(),
        path=Path("/snaps") / snapshot_id,
    )


async def test_snapshot_rows_round_trip_and_list_by_sandbox(store: Store) -> None:
    await store.insert(make_row("a"))
    first = await store.insert_snapshot(make_snapshot("s1", "a"))
    await store.insert_snapshot(make_snapshot("s2", "b"))
    assert await store.get_snapshot("s1") == first
    assert await store.get_snapshot("nope") is None
    assert [s.id for s in await store.list_snapshots()] == ["s1", "s2"]
    assert [s.id for s in await store.list_snapshots("a")] == ["s1"]


async def test_a_snapshot_in_use_cannot_be_deleted(store: Store) -> None:
    """Refused while a live fork uses it, or while a snapshot of a fork depends on it."""
    live = {"creating", "running", "paused", "stopping"}
    await store.insert_snapshot(make_snapshot("s1", "origin"))
    await store.insert(make_row("fork", state="running", snapshot_id="s1"))
    with pytest.raises(errors.Conflict, match="fork"):
        await store.delete_snapshot("s1", unless_used_in=live)
    await store.update("fork", state="stopped")
    await store.insert_snapshot(make_snapshot("s2", "fork"))  # its disk sits on s1's
    with pytest.raises(errors.Conflict, match="s2"):
        await store.delete_snapshot("s1", unless_used_in=live)
    await store.delete_snapshot("s2", unless_used_in=live)
    await store.delete_snapshot("s1", unless_used_in=live)
    assert await store.list_snapshots() == []
    with pytest.raises(errors.NotFound):
        await store.delete_snapshot("s1", unless_used_in=live)


# --- tenants (migration 3) ---------------------------------------------------------------


def test_migration_3_gives_old_rows_to_the_local_tenant(tmp_path: Path) -> None:
    """A v2 database with a sandbox, a snapshot and an exec log entry migrates to v3: the
    rows keep their data and belong to the built-in tenant, which exists as an admin."""
    path = tmp_path / "v2.db"
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        assert migrations.migrate(conn, migrations.MIGRATIONS[:2]) == 2
        conn.execute(
            "INSERT INTO sandboxes (id, state, image, vcpus, memory_mib, timeout_s, created_at,"
            " expires_at, updated_at, snapshot_id) VALUES ('old', 'running', 'default', 2, 256,"
            " 60, '2020-01-01T00:00:00.000000+00:00', '2020-01-01T00:01:00.000000+00:00',"
            " '2020-01-01T00:00:00.000000+00:00', 'snap-old')"
        )
        conn.execute(
            "INSERT INTO exec_log (sandbox_id, command, duration_ms, started_at)"
            " VALUES ('old', '[\"true\"]', 1.0, '2020-01-01T00:00:00.000000+00:00')"
        )
        conn.execute(
            "INSERT INTO snapshots (id, sandbox_id, image, image_hash, vcpus, memory_mib, vmm,"
            " vmm_version, size_bytes, created_at, path) VALUES ('snap-old', 'old', 'default',"
            " 'h', 2, 256, 'qemu', '7.2', 10, '2020-01-01T00:00:00.000000+00:00', '/s')"
        )
    finally:
        conn.close()
    conn = connect(path)  # migrates to the current version
    try:
        assert migrations.schema_version(conn) == SCHEMA_VERSION >= 3
        local = tenants.get_tenant(conn, LOCAL_TENANT_ID)
        assert local is not None and local.admin and local.name == "local"
        assert local.created_at.tzinfo is not None
        assert tenants.owner_of(conn, "sandboxes", "old") == LOCAL_TENANT_ID
        assert tenants.owner_of(conn, "snapshots", "snap-old") == LOCAL_TENANT_ID
        assert tenants.owner_of(conn, "sandboxes", "missing") is None
        assert tenants.usage(conn, LOCAL_TENANT_ID, {"running"}) == tenants.Usage(1, 2, 256, 1)
        assert not tenants.any_active_key(conn)
    finally:
        conn.close()


async def test_rows_keep_their_tenant_and_lists_filter_by_it(store: Store) -> None:
    """tenant_id round-trips and list/list_snapshots filter by it."""
    await store.call(lambda conn: tenants.insert_tenant(conn, make_tenant("tn-a", "a")))
    await store.insert(make_row("mine", tenant_id="tn-a"))
    await store.insert(make_row("theirs"))
    assert (await store.get("mine")) == make_row("mine", tenant_id="tn-a")
    assert [r.id for r in await store.list(tenant_id="tn-a")] == ["mine"]
    assert [r.id for r in await store.list(tenant_id=LOCAL_TENANT_ID)] == ["theirs"]
    assert len(await store.list()) == 2
    snap = replace(make_snapshot("s1", "mine"), tenant_id="tn-a")
    await store.insert_snapshot(snap)
    await store.insert_snapshot(make_snapshot("s2", "theirs"))
    assert [s.id for s in await store.list_snapshots(tenant_id="tn-a")] == ["s1"]
    assert [s.id for s in await store.list_snapshots("theirs", tenant_id="tn-a")] == []


async def test_snapshot_quota_is_checked_inside_the_insert(store: Store) -> None:
    """With tenant_max, the count and the insert are one transaction: of many concurrent
    inserts exactly tenant_max succeed; the others name the quota."""
    await store.call(lambda conn: tenants.insert_tenant(conn, make_tenant("tn-a", "a")))
    outcomes: list[str] = []

    async def one(i: int) -> None:
        row = replace(make_snapshot(f"s{i}", "sb"), tenant_id="tn-a")
        try:
            await store.insert_snapshot(row, tenant_max=3)
            outcomes.append("ok")
        except errors.QuotaExceeded as exc:
            assert exc.details["quota"] == "max_snapshots"
            outcomes.append("quota")

    async with anyio.create_task_group() as tg:
        for i in range(10):
            tg.start_soon(one, i)
    assert sorted(outcomes) == ["ok"] * 3 + ["quota"] * 7
    assert len(await store.list_snapshots(tenant_id="tn-a")) == 3


def make_tenant(tenant_id: str, name: str, **quotas: int) -> tenants.TenantRow:
    return tenants.TenantRow(tenant_id, name, False, utcnow(), **quotas)


async def test_paused_sandboxes_count_as_saved_vms(store: Store) -> None:
    """A paused sandbox holds a RAM dump and a disk like a snapshot: it counts towards
    its tenant's snapshots (and so towards max_snapshots), a running one does not."""
    await store.call(lambda conn: tenants.insert_tenant(conn, make_tenant("tn-a", "a")))
    await store.insert(make_row("paused1", state="paused", tenant_id="tn-a"))
    await store.insert(make_row("running1", state="running", tenant_id="tn-a"))
    await store.insert(make_row("other", state="paused"))  # the local tenant's
    await store.insert_snapshot(replace(make_snapshot("s1", "running1"), tenant_id="tn-a"))
    assert await store.call(lambda conn: tenants.snapshot_count(conn, "tn-a")) == 2
    with pytest.raises(errors.QuotaExceeded):
        await store.insert_snapshot(
            replace(make_snapshot("s2", "running1"), tenant_id="tn-a"), tenant_max=2
        )
