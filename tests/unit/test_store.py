"""The SQLite store: schema, typed rows, compare-and-set, filters, concurrency."""

from __future__ import annotations

import sqlite3
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import anyio
import pytest

from emberbox import errors
from emberbox.service.sandboxes.state import SandboxState, check_transition
from emberbox.store import (
    LOCAL_TENANT_ID,
    SCHEMA_VERSION,
    ExecLogEntry,
    SandboxRow,
    SnapshotRow,
    Store,
    migrations,
    tenants,
    utcnow,
)
from emberbox.store.db import connect
from tests.support.rows import make_row

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "emberbox.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[Store]:
    async with await Store.open(db_path) as opened:
        yield opened


def test_open_creates_private_dir_and_file(db_path: Path) -> None:
    """A fresh database lives in a 0700 directory, as a 0600 file, in WAL mode."""
    connect(db_path).close()
    assert stat.S_IMODE(db_path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_connection_pragmas(db_path: Path) -> None:
    """The connection runs with synchronous=FULL, foreign keys on and a busy timeout."""
    conn = connect(db_path)
    try:
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000
    finally:
        conn.close()


async def test_migrations_are_idempotent(db_path: Path) -> None:
    """Opening the same database twice runs each migration once and keeps the data."""
    async with await Store.open(db_path) as first:
        await first.insert(make_row())
        assert await first.schema_version() == SCHEMA_VERSION
    async with await Store.open(db_path) as second:
        assert await second.schema_version() == SCHEMA_VERSION
        assert (await second.get("sb1")) is not None


def test_migrate_applies_new_scripts_in_order(tmp_path: Path) -> None:
    """A later script runs on top of an existing database and bumps user_version."""
    conn = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    try:
        assert migrations.migrate(conn, ("CREATE TABLE a (x);",)) == 1
        assert migrations.migrate(conn, ("CREATE TABLE a (x);", "CREATE TABLE b (y);")) == 2
        assert migrations.migrate(conn, ("CREATE TABLE a (x);", "CREATE TABLE b (y);")) == 2
    finally:
        conn.close()


def test_failed_migration_rolls_back_whole(tmp_path: Path) -> None:
    """A script that fails halfway leaves neither its tables nor a version bump."""
    conn = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    try:
        with pytest.raises(sqlite3.OperationalError):
            migrations.migrate(conn, ("CREATE TABLE a (x);\nSELECT * FROM missing;",))
        assert migrations.schema_version(conn) == 0
        assert conn.execute("SELECT name FROM sqlite_master").fetchall() == []
    finally:
        conn.close()


async def test_newer_schema_is_refused(db_path: Path) -> None:
    """A database written by a newer emberbox is refused, not silently used."""
    await (await Store.open(db_path)).close()
    conn = sqlite3.connect(db_path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(errors.HostError, match="newer"):
        await Store.open(db_path)


async def test_roundtrip_keeps_types(store: Store) -> None:
    """A row comes back equal: aware UTC datetimes, dicts, paths, None."""
    row = make_row()
    assert await store.insert(row) == row
    got = await store.get("sb1")
    assert got == row
    assert got is not None and got.created_at.tzinfo is not None


async def test_naive_datetime_is_refused(store: Store) -> None:
    """Naive datetimes never reach the database."""
    with pytest.raises(ValueError, match="naive"):
        await store.insert(make_row(created_at=datetime(2020, 1, 1)))


async def test_duplicate_id_is_conflict(store: Store) -> None:
    """Inserting an existing id raises Conflict."""
    await store.insert(make_row())
    with pytest.raises(errors.Conflict, match="already exists"):
        await store.insert(make_row())


async def test_get_unknown_is_none(store: Store) -> None:
    """get() of an unknown id answers None."""
    assert await store.get("nope") is None


async def test_update_changes_fields_and_updated_at(store: Store) -> None:
    """update() sets the given columns and bumps updated_at; unknown ids are NotFound."""
    await store.insert(make_row())
    got = await store.update("sb1", vmm_pid=42, error="boom", work_dir=Path("/x"))
    assert (got.vmm_pid, got.error, got.work_dir) == (42, "boom", Path("/x"))
    assert got.updated_at > make_row().updated_at
    with pytest.raises(errors.NotFound):
        await store.update("nope", error="x")


async def test_transition_is_compare_and_set(store: Store) -> None:
    """transition() moves only from the expected states and sets fields with it."""
    await store.insert(make_row())
    got = await store.transition("sb1", {"creating"}, "running", vmm_pid=7)
    assert (got.state, got.vmm_pid) == ("running", 7)
    with pytest.raises(errors.Conflict) as caught:
        await store.transition("sb1", {"creating"}, "error", error="x")
    assert str(caught.value) == "sandbox sb1 is running; cannot move to error"
    assert (await store.get("sb1")) == got  # the failed CAS changed nothing
    with pytest.raises(errors.NotFound):
        await store.transition("nope", {"creating"}, "running")


async def test_transition_message_matches_state_machine(store: Store) -> None:
    """A lost race in the store is worded exactly like an illegal move."""
    await store.insert(make_row(state="stopped"))
    with pytest.raises(errors.Conflict) as from_store:
        await store.transition("sb1", {SandboxState.STOPPING}, SandboxState.RUNNING)
    with pytest.raises(errors.Conflict) as from_machine:
        check_transition(SandboxState.STOPPED, SandboxState.RUNNING, sandbox_id="sb1")
    assert str(from_store.value) == str(from_machine.value)


async def test_concurrent_transitions_have_one_winner(store: Store) -> None:
    """Of twenty tasks racing one CAS, exactly one wins and the rest get Conflict."""
    await store.insert(make_row())
    outcomes: list[str] = []

    async def race(n: int) -> None:
        try:
            await store.transition("sb1", {"creating"}, "running", vmm_pid=n)
            outcomes.append("won")
        except errors.Conflict:
            outcomes.append("lost")

    async with anyio.create_task_group() as tg:
        for n in range(20):
            tg.start_soon(race, n)
    assert sorted(outcomes) == ["lost"] * 19 + ["won"]


async def test_concurrent_inserts_from_many_tasks(store: Store) -> None:
    """Fifty tasks inserting and logging at once all land."""

    async def work(n: int) -> None:
        await store.insert(make_row(f"sb{n}"))
        await store.log_exec(
            ExecLogEntry(sandbox_id=f"sb{n}", command=["true"], started_at=utcnow(), duration_ms=1)
        )

    async with anyio.create_task_group() as tg:
        for n in range(50):
            tg.start_soon(work, n)
    assert await store.count() == 50
    assert len(await store.exec_log("sb7")) == 1


async def test_list_filters_by_state_metadata_and_expiry(store: Store) -> None:
    """list() filters by states, every metadata pair, and expires_before."""
    base = make_row().created_at
    await store.insert(make_row("a", state="running", metadata={"team": "x", "env": "prod"}))
    await store.insert(make_row("b", state="running", metadata={"team": "y"}))
    await store.insert(
        make_row("c", state="stopped", metadata={"team": "x"}, expires_at=base - timedelta(1))
    )

    def ids(rows: list[SandboxRow]) -> list[str]:
        return [r.id for r in rows]

    assert ids(await store.list()) == ["a", "b", "c"]
    assert ids(await store.list(states={"running"})) == ["a", "b"]
    assert ids(await store.list(states=[])) == []
    assert ids(await store.list(metadata={"team": "x"})) == ["a", "c"]
    assert ids(await store.list(metadata={"team": "x", "env": "prod"})) == ["a"]
    assert ids(await store.list(metadata={"team": "x"}, states={"stopped"})) == ["c"]
    assert ids(await store.list(metadata={"team": "z"})) == []
    assert ids(await store.list(expires_before=base)) == ["c"]
    assert await store.count(states={"running", "creating"}) == 2


async def test_metadata_filter_takes_any_key(store: Store) -> None:
    """Metadata keys with dots, quotes and dollar signs match literally."""
    odd = {'a.b"$[0]': "v", "k": "1"}
    await store.insert(make_row(metadata=odd))
    assert len(await store.list(metadata={'a.b"$[0]': "v"})) == 1
    assert await store.list(metadata={"a": "v"}) == []


async def test_exec_log_roundtrip_and_cascade(store: Store) -> None:
    """Exec log entries come back typed, and go with their sandbox on delete."""
    await store.insert(make_row())
    when = utcnow()
    logged = await store.log_exec(
        ExecLogEntry(
            sandbox_id="sb1", command="echo hi", started_at=when, duration_ms=2.5, exit_code=0
        )
    )
    assert logged.id is not None
    await store.log_exec(
        ExecLogEntry(
            sandbox_id="sb1", command=["sleep", "9"], started_at=when, duration_ms=9, timed_out=True
        )
    )
    entries = await store.exec_log("sb1")
    assert [e.command for e in entries] == ["echo hi", ["sleep", "9"]]
    assert entries[1].timed_out and entries[1].exit_code is None
    assert entries[0].started_at == when
    assert await store.delete("sb1") is True
    assert await store.exec_log("sb1") == []
    assert await store.delete("sb1") is False


async def test_exec_log_needs_an_existing_sandbox(store: Store) -> None:
    """The foreign key refuses exec log lines for unknown sandboxes."""
    with pytest.raises(sqlite3.IntegrityError):
        await store.log_exec(
            ExecLogEntry(sandbox_id="ghost", command=["x"], started_at=utcnow(), duration_ms=0)
        )


async def test_close_is_idempotent_and_final(db_path: Path) -> None:
    """close() twice is fine; calls after close raise instead of touching a closed handle."""
    store = await Store.open(db_path)
    await store.close()
    await store.close()
    assert store.closed
    with pytest.raises(errors.EmberboxError, match="closed"):
        await store.get("x")


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


def test_a_second_connection_keeps_the_first_ones_locks(db_path: Path) -> None:
    """Opening the database again in the same process (the server's tenancy connection
    next to the manager's) must not drop the first connection's POSIX locks: another
    process still cannot take the database out of WAL mode under it."""
    first = connect(db_path)
    try:
        assert first.execute("SELECT count(*) FROM sandboxes").fetchone() == (0,)
        connect(db_path).close()
        script = (
            "import sqlite3, sys; c = sqlite3.connect(sys.argv[1], timeout=0);"
            "print(c.execute('PRAGMA journal_mode = DELETE').fetchone()[0])"
        )
        other = subprocess.run(
            [sys.executable, "-c", script, str(db_path)], capture_output=True, text=True
        )
        assert other.stdout.strip() != "delete", other.stdout
        assert "locked" in other.stderr, other.stderr
        assert first.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        first.close()


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
