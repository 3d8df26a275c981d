"""Schema migrations, versioned in code.

``MIGRATIONS[i]`` moves a SQLite database from ``PRAGMA user_version`` ``i`` to ``i + 1``
(PostgreSQL: the same versions in :mod:`emberbox.store.pg_migrations`). Each
script runs in its own ``BEGIN IMMEDIATE`` transaction together with the version bump,
so a crash leaves the database at a whole version. Never edit a released script: append
a new one.
"""

from __future__ import annotations

import sqlite3

from emberbox import errors
from emberbox.store import pg_migrations
from emberbox.store.connection import Connection
from emberbox.store.postgres import PgConnection

MIGRATIONS: tuple[str, ...] = (
    # 1: sandboxes and the commands they ran.
    """
    CREATE TABLE sandboxes (
        id          TEXT PRIMARY KEY,
        state       TEXT NOT NULL,
        image       TEXT NOT NULL,
        vcpus       INTEGER NOT NULL CHECK (vcpus > 0),
        memory_mib  INTEGER NOT NULL CHECK (memory_mib > 0),
        metadata    TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(metadata)),
        env         TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(env)),
        timeout_s   INTEGER NOT NULL CHECK (timeout_s > 0),
        created_at  TEXT NOT NULL,
        expires_at  TEXT NOT NULL,
        updated_at  TEXT NOT NULL,
        vmm_pid     INTEGER,
        work_dir    TEXT,
        ip_address  TEXT,
        error       TEXT
    );
    CREATE INDEX sandboxes_state_expires ON sandboxes (state, expires_at);
    CREATE TABLE exec_log (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        sandbox_id  TEXT NOT NULL REFERENCES sandboxes (id) ON DELETE CASCADE,
        command     TEXT NOT NULL CHECK (json_valid(command)),
        exit_code   INTEGER,
        duration_ms REAL NOT NULL,
        timed_out   INTEGER NOT NULL DEFAULT 0 CHECK (timed_out IN (0, 1)),
        started_at  TEXT NOT NULL
    );
    CREATE INDEX exec_log_sandbox ON exec_log (sandbox_id, id);
    """,
    # 2: snapshots; a sandbox remembers the snapshot it was forked from and, while
    # paused, where its saved state is.
    """
    CREATE TABLE snapshots (
        id          TEXT PRIMARY KEY,
        sandbox_id  TEXT NOT NULL,
        image       TEXT NOT NULL,
        image_hash  TEXT NOT NULL,
        vcpus       INTEGER NOT NULL CHECK (vcpus > 0),
        memory_mib  INTEGER NOT NULL CHECK (memory_mib > 0),
        vmm         TEXT NOT NULL,
        vmm_version TEXT NOT NULL,
        size_bytes  INTEGER NOT NULL CHECK (size_bytes >= 0),
        created_at  TEXT NOT NULL,
        path        TEXT NOT NULL
    );
    CREATE INDEX snapshots_sandbox ON snapshots (sandbox_id, created_at);
    ALTER TABLE sandboxes ADD COLUMN snapshot_id TEXT;
    ALTER TABLE sandboxes ADD COLUMN paused_dir TEXT;
    CREATE INDEX sandboxes_snapshot ON sandboxes (snapshot_id);
    """,
    # 3: tenants, their API keys (a hash, never the secret) and the audit log; every
    # sandbox and snapshot belongs to a tenant (rows from before: the built-in "local").
    """
    CREATE TABLE tenants (
        id             TEXT PRIMARY KEY,
        name           TEXT NOT NULL UNIQUE,
        admin          INTEGER NOT NULL DEFAULT 0 CHECK (admin IN (0, 1)),
        max_sandboxes  INTEGER CHECK (max_sandboxes >= 0),
        max_vcpus      INTEGER CHECK (max_vcpus >= 0),
        max_memory_mib INTEGER CHECK (max_memory_mib >= 0),
        max_snapshots  INTEGER CHECK (max_snapshots >= 0),
        created_at     TEXT NOT NULL
    );
    INSERT INTO tenants (id, name, admin, created_at)
        VALUES ('local', 'local', 1, strftime('%Y-%m-%dT%H:%M:%f000+00:00', 'now'));
    CREATE TABLE api_keys (
        id           TEXT PRIMARY KEY,
        tenant_id    TEXT NOT NULL REFERENCES tenants (id),
        key_hash     TEXT NOT NULL,
        created_at   TEXT NOT NULL,
        last_used_at TEXT,
        revoked_at   TEXT
    );
    CREATE INDEX api_keys_tenant ON api_keys (tenant_id);
    CREATE INDEX api_keys_revoked ON api_keys (revoked_at);
    CREATE TABLE audit_log (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        at          TEXT NOT NULL,
        tenant_id   TEXT NOT NULL,
        key_id      TEXT,
        action      TEXT NOT NULL,
        target_id   TEXT,
        detail      TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(detail)),
        outcome     TEXT NOT NULL
    );
    CREATE INDEX audit_log_tenant ON audit_log (tenant_id, id);
    CREATE INDEX audit_log_action ON audit_log (action, id);
    ALTER TABLE sandboxes ADD COLUMN tenant_id TEXT NOT NULL DEFAULT 'local';
    ALTER TABLE snapshots ADD COLUMN tenant_id TEXT NOT NULL DEFAULT 'local';
    CREATE INDEX sandboxes_tenant ON sandboxes (tenant_id, state);
    CREATE INDEX snapshots_tenant ON snapshots (tenant_id);
    """,
    # 4: the cluster (docs/cluster.md): which host holds a sandbox or a snapshot, and
    # the hosts. A single host leaves ``host`` NULL and ``hosts`` empty.
    pg_migrations.CLUSTER_HOSTS,
)

SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(conn: Connection) -> int:
    """The version a database is at, on either backend."""
    if isinstance(conn, PgConnection):
        return pg_migrations.schema_version(conn)
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    return int(version)


def migrate(conn: sqlite3.Connection, migrations: tuple[str, ...] = MIGRATIONS) -> int:
    """Apply every pending script; returns the version reached. Idempotent.

    ``conn`` must be in autocommit mode (``isolation_level=None``) so that the explicit
    transactions here are the only ones.
    """
    current = schema_version(conn)
    if current > len(migrations):
        raise errors.HostError(
            f"database schema version {current} is newer than this emberbox understands "
            f"({len(migrations)}); upgrade emberbox or use another data_dir",
            schema_version=current,
        )
    for version in range(current, len(migrations)):
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Re-read inside the write lock: another process may have migrated meanwhile.
            if schema_version(conn) != version:
                conn.execute("ROLLBACK")
                continue
            for statement in _statements(migrations[version]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return schema_version(conn)


def _statements(script: str) -> list[str]:
    """Split a script into complete statements (``executescript`` would COMMIT for us)."""
    statements: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            if pending.strip():
                statements.append(pending.strip())
            pending = ""
    if pending.strip():
        raise ValueError(f"incomplete SQL statement in migration: {pending.strip()!r}")
    return statements
