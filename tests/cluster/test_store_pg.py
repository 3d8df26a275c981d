"""The store on a real PostgreSQL 15 (the cluster's shared state) and on SQLite: the same
behaviours on both backends, migration 4, hosts, ``lost``, and what only a shared
database has: two Store objects ("replicas") that see each other's writes, and races
between them that only one side wins. One PostgreSQL server for the module
(tests/support/postgres.py); every test gets a fresh database on it."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import anyio
import psycopg
import pytest

from emberbox import errors
from emberbox.cli.common import EXIT_ERROR
from emberbox.config import Settings
from emberbox.service.tenancy import keys
from emberbox.service.tenancy.access import read_audit
from emberbox.store import (
    LOCAL_TENANT_ID,
    SCHEMA_VERSION,
    ExecLogEntry,
    HostRow,
    SnapshotRow,
    Store,
    hosts,
    migrations,
    open_database,
    pg_migrations,
    postgres,
    tenants,
    utcnow,
)
from emberbox.store.sandboxes import prune_history
from tests.support.paths import REPO
from tests.support.postgres import fresh_database, running_postgres
from tests.support.rows import make_row

pytestmark = pytest.mark.anyio
LIVE = {"creating", "running", "paused", "stopping"}
_databases = itertools.count()


@pytest.fixture(scope="module")
def pg_server() -> Iterator[str]:
    """One PostgreSQL for the module; its URL (the ``emberbox`` database)."""
    with running_postgres() as url:
        yield url


@pytest.fixture
def pg_url(pg_server: str) -> str:
    """A fresh, empty database on the module's server."""
    return fresh_database(pg_server, f"t{next(_databases)}")


@pytest.fixture(params=["sqlite", "postgres"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """What Store.open takes: a SQLite path or a postgresql:// URL."""
    if request.param == "sqlite":
        return tmp_path / "data" / "emberbox.db"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
async def store(target: Path | str) -> AsyncIterator[Store]:
    async with await Store.open(target) as opened:
        yield opened


def make_snapshot(snapshot_id: str, sandbox_id: str, **overrides: object) -> SnapshotRow:
    row = SnapshotRow(
        id=snapshot_id,
        sandbox_id=sandbox_id,
        image="default",
        vcpus=1,
        memory_mib=512,
        vmm="qemu",
        vmm_version="7.2",
        size_bytes=5 << 30,  # past 32 bits: a real snapshot's size
        created_at=utcnow(),
        path=Path("/snaps") / snapshot_id,
    )
    return replace(row, **overrides)  # type: ignore[arg-type]


def make_tenant(tenant_id: str, name: str) -> tenants.TenantRow:
    return tenants.TenantRow(tenant_id, name, False, utcnow())


# --- the same behaviours on both backends -------------------------------------------------


async def test_rows_round_trip_and_duplicates_conflict(store: Store) -> None:
    """A row (with its host) comes back equal; a second insert of its id is Conflict."""
    row = make_row("sb1", host="h1", metadata={"team": "a"})
    assert await store.insert(row) == row
    assert await store.get("sb1") == row
    assert await store.get("nope") is None
    with pytest.raises(errors.Conflict, match="already exists"):
        await store.insert(row)
    assert await store.schema_version() == SCHEMA_VERSION == 4


async def test_list_filters_by_metadata_state_host_and_tenant(store: Store) -> None:
    """Metadata pairs match exactly (values with %, ? and quotes too, strings only);
    states, host and tenant filter; an empty state set matches nothing."""
    odd = "50% 'off'?"
    await store.insert(make_row("a", metadata={"team": "a", "note": odd}, host="h1"))
    await store.insert(make_row("b", metadata={"team": "b"}, state="running", host="h2"))
    await store.insert(make_row("c", metadata={"team": "a"}, state="running", tenant_id="t"))
    assert [r.id for r in await store.list(metadata={"team": "a"})] == ["a", "c"]
    assert [r.id for r in await store.list(metadata={"note": odd})] == ["a"]
    assert [r.id for r in await store.list(metadata={"team": "a", "note": odd})] == ["a"]
    assert await store.list(metadata={"note": "50%"}) == []
    assert await store.list(metadata={"team%": "a"}) == []
    assert [r.id for r in await store.list(states={"running"})] == ["b", "c"]
    assert await store.list(states=set()) == []
    assert [r.id for r in await store.list(host="h2")] == ["b"]
    assert [r.id for r in await store.list(tenant_id="t")] == ["c"]
    later = make_row().expires_at + timedelta(seconds=1)
    assert len(await store.list(expires_before=later)) == 3
    assert await store.count(states={"running"}) == 2
    usage = await store.call(lambda conn: tenants.usage(conn, "t", {"running"}))
    assert usage == tenants.Usage(1, 1, 512, 0)
    assert all(isinstance(value, int) for value in vars(usage).values())


async def test_transition_is_compare_and_set(store: Store) -> None:
    """transition() moves only from the expected states; unknown ids are NotFound."""
    await store.insert(make_row())
    moved = await store.transition("sb1", {"creating"}, "running", vmm_pid=7, host="h1")
    assert (moved.state, moved.vmm_pid, moved.host) == ("running", 7, "h1")
    with pytest.raises(errors.Conflict, match="sandbox sb1 is running; cannot move to paused"):
        await store.transition("sb1", {"creating"}, "paused")
    with pytest.raises(errors.NotFound):
        await store.transition("nope", {"creating"}, "running")
    updated = await store.update("sb1", error="x", metadata={"k": "v"})
    assert (updated.error, updated.metadata, updated.state) == ("x", {"k": "v"}, "running")


async def test_exec_log_and_retention(store: Store) -> None:
    """Entries get increasing ids and list in order; pruning keeps the newest and the
    ended sandboxes a snapshot names; deleting a sandbox deletes its log."""
    await store.insert(make_row("sb1"))
    now = utcnow()
    ids: list[int] = []
    for i in range(3):
        entry = ExecLogEntry("sb1", ["echo", str(i)], now, 1.5, exit_code=0)
        ids.append((await store.log_exec(entry)).id or 0)
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert [e.command for e in await store.exec_log("sb1")] == [
        ["echo", "0"],
        ["echo", "1"],
        ["echo", "2"],
    ]
    await store.insert(make_row("old", state="stopped"))
    await store.insert(make_row("kept", state="stopped"))
    await store.insert_snapshot(make_snapshot("s1", "kept"))
    far = now + timedelta(days=1)
    gone = await store.call(
        lambda conn: prune_history(conn, ended_before=far, execs_before=now, max_execs=1)
    )
    assert gone == (1, 2)
    assert [r.id for r in await store.list()] == ["kept", "sb1"]
    assert len(await store.exec_log("sb1")) == 1
    assert await store.delete("sb1") and not await store.delete("sb1")
    assert await store.exec_log("sb1") == []


async def test_snapshots_round_trip_and_refuse_deletion_in_use(store: Store) -> None:
    """A snapshot (5 GiB, with its host) round-trips; deleting one a live fork uses is
    Conflict, then it goes; an unknown one is NotFound."""
    snap = make_snapshot("s1", "origin", host="h1")
    assert await store.insert_snapshot(snap) == snap
    assert await store.get_snapshot("s1") == snap
    await store.insert(make_row("fork", state="running", snapshot_id="s1"))
    with pytest.raises(errors.Conflict, match="fork"):
        await store.delete_snapshot("s1", unless_used_in=LIVE)
    await store.update("fork", state="stopped")
    await store.delete_snapshot("s1", unless_used_in=LIVE)
    assert await store.list_snapshots() == []
    with pytest.raises(errors.NotFound):
        await store.delete_snapshot("s1", unless_used_in=LIVE)


async def test_snapshot_quota_is_atomic(store: Store) -> None:
    """Of ten concurrent inserts with tenant_max=3 exactly three succeed."""
    await store.call(lambda conn: tenants.insert_tenant(conn, make_tenant("tn-a", "a")))
    outcomes = await _insert_snapshots([store], "tn-a", 10, tenant_max=3)
    assert sorted(outcomes) == ["ok"] * 3 + ["quota"] * 7


async def test_tenants_keys_and_audit(store: Store) -> None:
    """A key is created (its tenant too), verifies by id + secret, is revoked; the
    audit log names both, newest first; a taken tenant name is Conflict."""
    made = await store.call(lambda conn: keys.create_key(conn, "acme", quotas={"max_vcpus": 3}))
    key_id, secret = keys.parse_key(made.key) or ("", "")
    found = await store.call(lambda conn: tenants.key_with_tenant(conn, key_id))
    assert found is not None
    key, tenant = found
    assert keys.secret_matches(secret, key.key_hash)
    assert not keys.secret_matches("0" * 64, key.key_hash)
    assert (tenant.name, tenant.overrides()) == ("acme", {"max_vcpus": 3})
    assert await store.call(tenants.any_active_key)
    with pytest.raises(errors.Conflict, match="acme"):
        await store.call(lambda conn: tenants.insert_tenant(conn, make_tenant("tn-x", "acme")))
    assert await store.call(lambda conn: keys.revoke(conn, "acme")) == [key_id]
    assert await store.call(lambda conn: keys.revoke(conn, "acme")) == []
    assert not await store.call(tenants.any_active_key)
    audit = await store.call(lambda conn: read_audit(conn, None, None, 10))
    assert [(e.action, e.target_id, name) for e, name in audit] == [
        ("key.revoke", key_id, "local"),
        ("key.create", key_id, "local"),
    ]
    local = await store.call(lambda conn: tenants.get_tenant(conn, LOCAL_TENANT_ID))
    assert local is not None and local.admin and local.created_at.tzinfo is not None
    at = utcnow()
    await store.call(lambda conn: tenants.touch_key(conn, key_id, at))
    found = await store.call(lambda conn: tenants.key_with_tenant(conn, key_id))
    assert found is not None and found[0].last_used_at == at
    entry = tenants.AuditEntry(tenant.id, "sandbox.exec", "ok", detail={"cmd": "50%?"})
    await store.call(lambda conn: tenants.insert_audit(conn, entry))
    newest = await store.call(lambda conn: tenants.list_audit(conn, tenant_id=tenant.id))
    assert [(e.action, e.detail) for e in newest] == [("sandbox.exec", {"cmd": "50%?"})]
    pruned = await store.call(
        lambda conn: tenants.prune_audit(conn, before=at - timedelta(days=1), keep_rows=1)
    )
    assert pruned == 2
    await store.insert(make_row("mine", tenant_id=tenant.id))
    owner = await store.call(lambda conn: tenants.owner_of(conn, "sandboxes", "mine"))
    assert owner == tenant.id


async def test_hosts(store: Store) -> None:
    """upsert inserts then overwrites; set_host changes state and draining; unknown
    hosts are NotFound and unknown states refused."""
    first = await store.upsert_host(HostRow("h2", "http://10.0.0.2:9000", "node-2"))
    assert (first.state, first.draining) == ("up", False)
    await store.upsert_host(HostRow("h1", "http://10.0.0.1:9000", "node-1", "down", True))
    moved = await store.upsert_host(HostRow("h2", "http://10.0.0.2:9001", "node-9"))
    assert (moved.url, moved.node_id) == ("http://10.0.0.2:9001", "node-9")
    assert [h.name for h in await store.list_hosts()] == ["h1", "h2"]
    drained = await store.set_host("h2", draining=True)
    assert (drained.state, drained.draining) == ("up", True)
    down = await store.set_host("h2", state="down")
    assert (down.state, down.draining) == ("down", True)
    assert down.updated_at >= drained.updated_at
    assert await store.get_host("h2") == down
    assert await store.get_host("nope") is None
    with pytest.raises(errors.NotFound):
        await store.set_host("nope", state="up")
    with pytest.raises(ValueError, match="host state"):
        await store.set_host("h1", state="gone")


async def test_mark_lost(store: Store) -> None:
    """Only the host's sandboxes in the given states become lost; a second call finds
    none; lost is a state like any other (a transition moves it back)."""
    await store.insert(make_row("a", state="running", host="h1"))
    await store.insert(make_row("b", state="paused", host="h1"))
    await store.insert(make_row("c", state="stopped", host="h1"))
    await store.insert(make_row("d", state="running", host="h2"))
    assert await store.mark_lost("h1", {"running", "paused", "creating"}) == ["a", "b"]
    assert await store.mark_lost("h1", {"running", "paused", "creating"}) == []
    assert await store.mark_lost("h1", set()) == []
    states = {r.id: r.state for r in await store.list()}
    assert states == {"a": "lost", "b": "lost", "c": "stopped", "d": "running"}
    assert (await store.transition("a", {"lost"}, "running")).state == "running"


async def test_count_by_host(store: Store) -> None:
    """Per host, the sandboxes in the given states; hostless rows and other states are
    not counted (placement's view of what the index holds)."""
    await store.insert(make_row("a", state="running", host="h1"))
    await store.insert(make_row("b", state="paused", host="h1"))
    await store.insert(make_row("c", state="stopped", host="h1"))
    await store.insert(make_row("d", state="running", host="h2"))
    await store.insert(make_row("e", state="running"))
    live = {"running", "paused", "creating"}
    assert await store.call(lambda conn: hosts.count_by_host(conn, live)) == {"h1": 2, "h2": 1}
    assert await store.call(lambda conn: hosts.count_by_host(conn, set())) == {}


async def test_migration_4_upgrades_a_v3_database(target: Path | str) -> None:
    """A v3 database with a sandbox and a snapshot moves to v4: rows keep their data with
    host NULL, and the hosts table is there."""
    script = (
        "INSERT INTO sandboxes (id, state, image, vcpus, memory_mib, timeout_s, created_at,"
        " expires_at, updated_at) VALUES ('old', 'running', 'default', 2, 256, 60,"
        " '2020-01-01T00:00:00.000000+00:00', '2020-01-01T00:01:00.000000+00:00',"
        " '2020-01-01T00:00:00.000000+00:00')"
    )
    if isinstance(target, str):
        conn = postgres.connect_unmigrated(target)
        try:
            assert pg_migrations.migrate(conn, pg_migrations.PG_MIGRATIONS[:3]) == 3
            conn.execute(script)
        finally:
            conn.close()
    else:
        target.parent.mkdir(parents=True)
        import sqlite3

        raw = sqlite3.connect(target, isolation_level=None)
        try:
            assert migrations.migrate(raw, migrations.MIGRATIONS[:3]) == 3
            raw.execute(script)
        finally:
            raw.close()
    async with await Store.open(target) as store:
        assert await store.schema_version() == 4
        old = await store.get("old")
        assert old is not None and old.host is None and old.tenant_id == LOCAL_TENANT_ID
        assert await store.list_hosts() == []
        assert [r.id for r in await store.list(host=None)] == ["old"]


# --- only PostgreSQL: a database shared by replicas ---------------------------------------


async def test_two_replicas_see_each_others_writes(pg_url: str) -> None:
    """A sandbox, a key and a host written through one Store are read through another."""
    async with await Store.open(pg_url) as one, await Store.open(pg_url) as two:
        await one.insert(make_row("sb1", host="h1"))
        made = await two.call(lambda conn: keys.create_key(conn, "acme"))
        await two.upsert_host(HostRow("h1", "http://h1", "n1"))
        assert (await two.get("sb1")) == make_row("sb1", host="h1")
        found = await one.call(lambda conn: tenants.key_with_tenant(conn, made.key_id))
        assert found is not None and found[1].name == "acme"
        assert [h.name for h in await one.list_hosts()] == ["h1"]
        await two.transition("sb1", {"creating"}, "running")
        assert (await one.get("sb1") or make_row()).state == "running"


async def test_concurrent_transitions_across_replicas_have_one_winner(pg_url: str) -> None:
    """Twenty tasks on two Stores race to move each sandbox creating -> running: per
    sandbox exactly one wins, every other gets Conflict."""
    async with await Store.open(pg_url) as one, await Store.open(pg_url) as two:
        for i in range(5):
            await one.insert(make_row(f"sb{i}"))
        wins: dict[str, int] = {}
        conflicts = 0

        async def race(store: Store, sandbox_id: str) -> None:
            nonlocal conflicts
            try:
                await store.transition(sandbox_id, {"creating"}, "running")
                wins[sandbox_id] = wins.get(sandbox_id, 0) + 1
            except errors.Conflict:
                conflicts += 1

        async with anyio.create_task_group() as tg:
            for i in range(5):
                for _ in range(2):
                    tg.start_soon(race, one, f"sb{i}")
                    tg.start_soon(race, two, f"sb{i}")
        assert wins == {f"sb{i}": 1 for i in range(5)}
        assert conflicts == 15


async def test_snapshot_quota_holds_across_replicas(pg_url: str) -> None:
    """The quota check and the insert are one locked transaction across replicas: of
    twelve concurrent inserts through two Stores with tenant_max=4, exactly four land."""
    async with await Store.open(pg_url) as one, await Store.open(pg_url) as two:
        await one.call(lambda conn: tenants.insert_tenant(conn, make_tenant("tn-a", "a")))
        outcomes = await _insert_snapshots([one, two], "tn-a", 12, tenant_max=4)
        assert sorted(outcomes) == ["ok"] * 4 + ["quota"] * 8
        assert len(await two.list_snapshots(tenant_id="tn-a")) == 4


def test_concurrent_migrations_from_replicas_are_safe(pg_url: str) -> None:
    """Four replicas starting at once on an empty database migrate it once: all reach
    version 4 and the built-in tenant exists once."""
    barrier = threading.Barrier(4)
    results: list[object] = []

    def start() -> None:
        barrier.wait()
        try:
            conn = postgres.connect(pg_url)
            results.append(pg_migrations.schema_version(conn))
            conn.close()
        except Exception as exc:  # reported below, with the others
            results.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == [4, 4, 4, 4]
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM tenants").fetchone() == (1,)
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(4,)]


async def test_a_newer_schema_is_refused(pg_url: str) -> None:
    """A database migrated by a newer emberbox is refused with HostError."""
    await (await Store.open(pg_url)).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(errors.HostError, match="newer"):
        await Store.open(pg_url)


async def test_a_dropped_connection_is_replaced(pg_url: str, pg_server: str) -> None:
    """When PostgreSQL drops the store's connection, the call that meets it fails with
    HostError (not a psycopg traceback) and the next call works on a new connection."""
    async with await Store.open(pg_url) as store:
        await store.insert(make_row("sb1"))
        with psycopg.connect(pg_server, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'emberbox' AND datname = %s",
                (pg_url.rsplit("/", 1)[1],),
            )
        with pytest.raises(errors.HostError, match="database"):
            await store.get("sb1")
        assert (await store.get("sb1")) is not None


async def test_a_held_lock_is_a_host_error_not_a_hang(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica stuck inside a transaction (here: a session holding the store's lock)
    makes another's write fail with HostError after the lock timeout, not hang; the
    write works once the lock is free."""
    monkeypatch.setattr(postgres, "LOCK_TIMEOUT_S", 0.5)
    async with await Store.open(pg_url) as store:
        await store.insert(make_row("sb1"))
        with psycopg.connect(pg_url, autocommit=True) as stuck:
            stuck.execute("BEGIN")
            stuck.execute("SELECT pg_advisory_xact_lock(%s)", (postgres.STORE_LOCK_KEY,))
            with pytest.raises(errors.HostError, match="lock timeout"):
                await store.transition("sb1", {"creating"}, "running")
            stuck.execute("ROLLBACK")
        assert (await store.transition("sb1", {"creating"}, "running")).state == "running"


async def test_unreachable_or_refusing_database_is_host_error_without_password(
    pg_url: str, pg_server: str
) -> None:
    """A closed port, a wrong password and a bad URL are HostError; the password is in
    no message."""
    port = pg_server.rsplit(":", 1)[1].split("/")[0]
    closed = pg_url.replace(f":{port}/", ":1/")
    wrong = pg_url.replace(_password(pg_url), "s3cret-wrong")
    for url, password in ((closed, _password(pg_url)), (wrong, "s3cret-wrong")):
        with pytest.raises(errors.HostError) as caught:
            await Store.open(url)
        assert password not in str(caught.value)
        assert "***" in str(caught.value)
    with pytest.raises(errors.HostError) as caught:
        await Store.open("postgresql://u:pw-xyz@127.0.0.1:notaport/db")
    assert "pw-xyz" not in str(caught.value)


def test_cli_keys_and_audit_use_the_database_url(pg_url: str, tmp_path: Path) -> None:
    """`emberbox keys create` and `emberbox audit` (real processes) work on PostgreSQL
    when EMBERBOX_DATABASE_URL is set, and write nothing to the data dir; a bad URL is
    one clear line and the CLI's error exit code, no traceback, no password."""
    env = {**os.environ, "EMBERBOX_DATA_DIR": str(tmp_path / "unused")}
    env["EMBERBOX_DATABASE_URL"] = pg_url
    made = _cli(env, "keys", "create", "--name", "acme", "--admin")
    assert made.returncode == 0, made.stderr
    key_id, _ = keys.parse_key(made.stdout.strip()) or ("?", "")
    audit = _cli(env, "audit", "--json")
    assert audit.returncode == 0, audit.stderr
    assert f'"target_id": "{key_id}"' in audit.stdout and "key.create" in audit.stdout
    assert not (tmp_path / "unused").exists()
    with open_database(Settings(database_url=pg_url)) as conn:
        assert [k.id for k in tenants.list_keys(conn)] == [key_id]
    env["EMBERBOX_DATABASE_URL"] = pg_url.replace(pg_url.rsplit(":", 1)[1], "1/nodb")
    bad = _cli(env, "keys", "list")
    assert bad.returncode == EXIT_ERROR, bad.stderr
    assert "cannot connect to the database" in bad.stderr
    assert "Traceback" not in bad.stderr and _password(pg_url) not in bad.stderr


# --- helpers ------------------------------------------------------------------------------


async def _insert_snapshots(
    stores: list[Store], tenant_id: str, count: int, *, tenant_max: int
) -> list[str]:
    outcomes: list[str] = []

    async def one(i: int) -> None:
        row = make_snapshot(f"s{i}", "sb", tenant_id=tenant_id)
        try:
            await stores[i % len(stores)].insert_snapshot(row, tenant_max=tenant_max)
            outcomes.append("ok")
        except errors.QuotaExceeded:
            outcomes.append("quota")

    async with anyio.create_task_group() as tg:
        for i in range(count):
            tg.start_soon(one, i)
    return outcomes


def _password(url: str) -> str:
    return url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    script = "import sys; from emberbox.cli import main; sys.exit(main())"
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
