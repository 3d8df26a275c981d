"""The pure pieces of the two-backend store: ``?`` to ``%s`` (literals, comments, ``%``),
which backend a target means, the database URL setting, passwords kept out of messages,
PostgreSQL errors mapped at the boundary, the schema versions kept in step, and the
single-host path never loading psycopg."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from emberbox import errors
from emberbox.config import Settings
from emberbox.store import database_target, migrations, pg_migrations, postgres
from emberbox.store.connection import is_postgres, to_pyformat
from emberbox.store.db import SqliteBackend, integrity_errors
from emberbox.store.store import backend_for


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        (
            "SELECT * FROM t WHERE a = ? AND b IN (?, ?)",
            "SELECT * FROM t WHERE a = %s AND b IN (%s, %s)",
        ),
        ("SELECT 100 % 7, ?", "SELECT 100 %% 7, %s"),
        ("SELECT '?', ?", "SELECT '?', %s"),
        ("SELECT 'it''s ?%', ?", "SELECT 'it''s ?%%', %s"),
        ('SELECT "odd?col" FROM t WHERE x = ?', 'SELECT "odd?col" FROM t WHERE x = %s'),
        ("SELECT 1 -- why? 5%\n, ?", "SELECT 1 -- why? 5%%\n, %s"),
        ("SELECT /* ? */ ?", "SELECT /* ? */ %s"),
        ("SELECT 'unclosed ?", "SELECT 'unclosed ?"),
        ("", ""),
    ],
)
def test_placeholders_become_pyformat(sql: str, expected: str) -> None:
    """``?`` outside literals, identifiers and comments becomes ``%s``; every ``%`` is
    doubled, inside literals too (psycopg reads them everywhere)."""
    assert to_pyformat(sql) == expected


def test_store_sql_keeps_its_placeholder_count() -> None:
    """The metadata filter and the local tenant's insert translate as intended: one
    ``%s`` per ``?``, and the SQLite strftime's ``%`` doubled."""
    sql = "sandboxes.metadata::jsonb @> CAST(? AS jsonb) AND state IN (?, ?)"
    assert to_pyformat(sql).count("%s") == 3
    assert to_pyformat("strftime('%Y', 'now') = ?") == "strftime('%%Y', 'now') = %s"


@pytest.mark.parametrize(
    ("target", "sqlite"),
    [
        (Path("/data/emberbox.db"), True),
        ("/data/emberbox.db", True),
        ("postgresql://u:p@db:5432/emberbox", False),
        ("postgres://u@db/emberbox", False),
        ("POSTGRESQL://u@db/emberbox", False),
    ],
)
def test_backend_for_a_target(target: Path | str, sqlite: bool) -> None:
    """A postgresql:// (or postgres://) URL is PostgreSQL; anything else a SQLite path."""
    backend = backend_for(target)
    assert isinstance(backend, SqliteBackend) is sqlite
    assert isinstance(backend, postgres.PgBackend) is not sqlite


def test_database_target_from_settings(tmp_path: Path) -> None:
    """No URL: the data dir's SQLite file; a postgresql:// URL: that URL; another
    scheme: HostError that shows the scheme and not the password."""
    assert database_target(Settings(data_dir=tmp_path)) == tmp_path / "emberbox.db"
    url = "postgresql://u:pw@db:5432/e"
    assert database_target(Settings(data_dir=tmp_path, database_url=url)) == url
    with pytest.raises(errors.HostError, match="postgresql://") as caught:
        database_target(Settings(database_url="mysql://root:hunter2@db/e"))
    assert "hunter2" not in str(caught.value) and "mysql" in str(caught.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://emberbox:s3cret@db:5432/e", "postgresql://emberbox:***@db:5432/e"),
        ("postgresql://emberbox:p%40ss@db/e", "postgresql://emberbox:***@db/e"),
        ("postgresql://emberbox@db/e", "postgresql://emberbox@db/e"),
        ("postgresql://db/e?user=x&password=s3cret", "postgresql://db/e?user=x&password=***"),
        ("postgresql://db/e", "postgresql://db/e"),
    ],
)
def test_redact_hides_the_password(url: str, shown: str) -> None:
    """The URL as messages show it: user, host and database, never the password."""
    assert postgres.redact(url) == shown


def test_scrub_removes_the_password_in_any_spelling() -> None:
    """An error message that quotes the password, raw or percent-decoded, loses it."""
    url = "postgresql://emberbox:p%40ss@db/e"
    assert postgres.scrub("bad value p@ss and p%40ss", url) == "bad value *** and ***"


def test_database_errors_map_at_the_boundary() -> None:
    """Disk full is StorageFull (507); a lost or refused connection HostError (503)
    without the password; anything else passes through."""
    url = "postgresql://u:s3cret@db/e"
    with pytest.raises(errors.StorageFull), postgres.database_errors("db", url):
        raise psycopg.errors.DiskFull("could not extend file")
    with pytest.raises(errors.HostError) as caught, postgres.database_errors("db", url):
        raise psycopg.OperationalError("server closed the connection; s3cret")
    assert "s3cret" not in str(caught.value)
    with pytest.raises(psycopg.errors.UniqueViolation), postgres.database_errors("db", url):
        raise psycopg.errors.UniqueViolation("dup")


def test_dialect_and_integrity_errors_of_a_sqlite_connection() -> None:
    """A sqlite3 connection is SQLite, and its constraint errors are sqlite3's."""
    conn = sqlite3.connect(":memory:")
    try:
        assert not is_postgres(conn)
        assert integrity_errors(conn) == (sqlite3.IntegrityError,)
    finally:
        conn.close()


def test_postgres_schema_has_the_same_versions() -> None:
    """Every SQLite migration has its PostgreSQL twin (a version means one schema)."""
    assert len(pg_migrations.PG_MIGRATIONS) == len(migrations.MIGRATIONS) == 4


def test_migration_4_on_sqlite(tmp_path: Path) -> None:
    """Version 4 adds sandboxes.host, snapshots.host and the hosts table."""
    conn = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    try:
        assert migrations.migrate(conn) == 4
        columns = {row[1] for row in conn.execute("PRAGMA table_info(hosts)")}
        assert columns == {"name", "url", "node_id", "state", "draining", "updated_at"}
        for table in ("sandboxes", "snapshots"):
            assert "host" in {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute("INSERT INTO hosts (name, state, updated_at) VALUES ('h', 'gone', 'now')")
    finally:
        conn.close()


def test_the_single_host_path_never_loads_psycopg() -> None:
    """The store, the tenancy service, the keys CLI and the server's app import without
    psycopg (it is loaded only for a postgresql:// URL)."""
    script = (
        "import sys, emberbox.store, emberbox.cli.keys, emberbox.service.tenancy.access,"
        " emberbox.api.app; print('psycopg' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "False"
