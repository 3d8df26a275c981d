"""The schema on PostgreSQL: the same versions as :mod:`emberbox.store.migrations`.

``PG_MIGRATIONS[i]`` is SQLite's ``MIGRATIONS[i]`` in PostgreSQL's words, so a version
means the same tables in both: identity columns for ``AUTOINCREMENT``, a ``::jsonb``
cast check for ``json_valid``, ``to_char(now())`` for ``strftime``, ``BIGINT`` where
SQLite's INTEGER holds 64 bits, and the version in a ``schema_version`` table rather than
``PRAGMA user_version``. JSON columns stay TEXT (as on SQLite), so rows read back the
same; the metadata filter casts to jsonb.

Each version runs in its own transaction holding the store's advisory lock
(:func:`emberbox.store.postgres.transaction`), with the version re-read under the lock:
API replicas that start together migrate once. Never edit a released script: append.
"""

from __future__ import annotations

from emberbox import errors
from emberbox.store.postgres import PgConnection, transaction

# Version 4 in words both backends take alike: SQLite's MIGRATIONS[3] is this too.
CLUSTER_HOSTS = """
    ALTER TABLE sandboxes ADD COLUMN host TEXT;
    ALTER TABLE snapshots ADD COLUMN host TEXT;
    CREATE INDEX sandboxes_host ON sandboxes (host, state);
    CREATE TABLE hosts (
        name       TEXT PRIMARY KEY,
        url        TEXT,
        node_id    TEXT,
        state      TEXT NOT NULL DEFAULT 'down' CHECK (state IN ('up', 'down')),
        draining   INTEGER NOT NULL DEFAULT 0 CHECK (draining IN (0, 1)),
        updated_at TEXT NOT NULL
    );
"""

PG_MIGRATIONS: tuple[str, ...] = (
    # 1: sandboxes and the commands they ran.
    """
    CREATE TABLE sandboxes (
        id          TEXT PRIMARY KEY,
        state       TEXT NOT NULL,
        image       TEXT NOT NULL,
        vcpus       BIGINT NOT NULL CHECK (vcpus > 0),
        memory_mib  BIGINT NOT NULL CHECK (memory_mib > 0),
        metadata    TEXT NOT NULL DEFAULT '{}' CHECK (metadata::jsonb IS NOT NULL),
        env         TEXT NOT NULL DEFAULT '{}' CHECK (env::jsonb IS NOT NULL),
        timeout_s   BIGINT NOT NULL CHECK (timeout_s > 0),
        created_at  TEXT NOT NULL,
        expires_at  TEXT NOT NULL,
        updated_at  TEXT NOT NULL,
        vmm_pid     BIGINT,
        work_dir    TEXT,
        ip_address  TEXT,
        error       TEXT
    );
    CREATE INDEX sandboxes_state_expires ON sandboxes (state, expires_at);
    CREATE TABLE exec_log (
        id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        sandbox_id  TEXT NOT NULL REFERENCES sandboxes (id) ON DELETE CASCADE,
        command     TEXT NOT NULL CHECK (command::jsonb IS NOT NULL),
        exit_code   BIGINT,
        duration_ms DOUBLE PRECISION NOT NULL,
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
        vcpus       BIGINT NOT NULL CHECK (vcpus > 0),
        memory_mib  BIGINT NOT NULL CHECK (memory_mib > 0),
        vmm         TEXT NOT NULL,
        vmm_version TEXT NOT NULL,
        size_bytes  BIGINT NOT NULL CHECK (size_bytes >= 0),
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
        max_sandboxes  BIGINT CHECK (max_sandboxes >= 0),
        max_vcpus      BIGINT CHECK (max_vcpus >= 0),
        max_memory_mib BIGINT CHECK (max_memory_mib >= 0),
        max_snapshots  BIGINT CHECK (max_snapshots >= 0),
        created_at     TEXT NOT NULL
    );
    INSERT INTO tenants (id, name, admin, created_at)
        VALUES ('local', 'local', 1,
                to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'));
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
        id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        at          TEXT NOT NULL,
        tenant_id   TEXT NOT NULL,
        key_id      TEXT,
        action      TEXT NOT NULL,
        target_id   TEXT,
        detail      TEXT NOT NULL DEFAULT '{}' CHECK (detail::jsonb IS NOT NULL),
        outcome     TEXT NOT NULL
    );
    CREATE INDEX audit_log_tenant ON audit_log (tenant_id, id);
    CREATE INDEX audit_log_action ON audit_log (action, id);
    ALTER TABLE sandboxes ADD COLUMN tenant_id TEXT NOT NULL DEFAULT 'local';
    ALTER TABLE snapshots ADD COLUMN tenant_id TEXT NOT NULL DEFAULT 'local';
    CREATE INDEX sandboxes_tenant ON sandboxes (tenant_id, state);
    CREATE INDEX snapshots_tenant ON snapshots (tenant_id);
    """,
    # 4: the cluster: which host holds a sandbox or a snapshot, and the hosts.
    CLUSTER_HOSTS,
)

_VERSION_TABLE = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"


def schema_version(conn: PgConnection) -> int:
    """The version reached; 0 for an empty database."""
    # A catalog query, not to_regclass(): that reads the backend's catalog cache, which a
    # transaction that waited on the advisory lock may hold stale (no table yet).
    found = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_tables"
        " WHERE schemaname = current_schema() AND tablename = 'schema_version')"
    ).fetchone()
    if not found[0]:
        return 0
    row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    return int(row[0]) if row[0] is not None else 0


def migrate(conn: PgConnection, migrations: tuple[str, ...] = PG_MIGRATIONS) -> int:
    """Apply every pending script, each with its version bump in one locked
    transaction; returns the version reached. Idempotent; safe from several replicas."""
    current = schema_version(conn)
    if current > len(migrations):
        raise errors.HostError(
            f"database schema version {current} is newer than this emberbox understands "
            f"({len(migrations)}); upgrade emberbox or use another database",
            schema_version=current,
        )
    for version in range(current, len(migrations)):
        with transaction(conn):
            # Re-read under the lock: another replica may have migrated meanwhile.
            if schema_version(conn) != version:
                continue
            if version == 0:
                conn.execute(_VERSION_TABLE)
            conn.run_script(migrations[version])
            conn.execute("DELETE FROM schema_version")
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version + 1,))
    return schema_version(conn)
