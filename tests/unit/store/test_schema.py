"""The database itself: its file, connection pragmas, migrations, and locks across
connections."""

from __future__ import annotations

import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from emberbox import errors
from emberbox.store import SCHEMA_VERSION, Store, migrations
from emberbox.store.db import connect
from tests.support.rows import make_row

pytestmark = pytest.mark.anyio


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
