"""SQLite persistence for sandboxes and their exec log.

One connection, opened in autocommit mode with WAL, ``synchronous=FULL`` and foreign keys
on. Every call runs in a worker thread (``anyio.to_thread``) behind an :class:`anyio.Lock`,
so the connection is used by one thread at a time and the event loop never blocks on
disk. Writes that read-then-write run inside ``BEGIN IMMEDIATE`` so they are atomic
against other processes too.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import json
import os
import sqlite3
from collections.abc import Callable, Collection, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar, Unpack

import anyio
import anyio.to_thread

from emberbox import errors
from emberbox.store import migrations, tenants
from emberbox.store.records import (
    SANDBOX_COLUMNS,
    SNAPSHOT_COLUMNS,
    UPDATABLE_COLUMNS,
    ExecLogEntry,
    SandboxFields,
    SandboxRow,
    SnapshotRow,
    encode_time,
    encode_value,
    exec_from_db,
    row_to_params,
    sandbox_from_db,
    snapshot_from_db,
    snapshot_to_params,
    utcnow,
)

T = TypeVar("T")

BUSY_TIMEOUT_MS = 5000
# Statements built from fixed column names only; values always go through "?".
_COLUMNS = ", ".join(SANDBOX_COLUMNS)
_MARKS = ", ".join("?" for _ in SANDBOX_COLUMNS)
_SELECT_SANDBOX = f"SELECT {_COLUMNS} FROM sandboxes"  # noqa: S608
_INSERT_SANDBOX = f"INSERT INTO sandboxes ({_COLUMNS}) VALUES ({_MARKS})"  # noqa: S608
_SELECT_SNAPSHOT = f"SELECT {', '.join(SNAPSHOT_COLUMNS)} FROM snapshots"  # noqa: S608
_INSERT_SNAPSHOT = (
    f"INSERT INTO snapshots ({', '.join(SNAPSHOT_COLUMNS)}) "  # noqa: S608
    f"VALUES ({', '.join('?' for _ in SNAPSHOT_COLUMNS)})"
)
_SELECT_EXEC = (
    "SELECT id, sandbox_id, command, exit_code, duration_ms, timed_out, started_at FROM exec_log"
)


class Store:
    """The sandbox database. Open with :meth:`open`; :meth:`close` is idempotent."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = conn
        self._lock = anyio.Lock()

    @classmethod
    async def open(cls, path: Path) -> Store:
        """Create (0700 dir, 0600 file) or open the database and bring its schema up to date."""
        with storage_full_errors(path):
            conn = await anyio.to_thread.run_sync(connect, path)
        return cls(path, conn)

    async def close(self) -> None:
        async with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                await anyio.to_thread.run_sync(conn.close)

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        return self._conn is None

    # -- sandboxes ---------------------------------------------------------------------

    async def insert(self, row: SandboxRow) -> SandboxRow:
        """Insert a new sandbox; :class:`errors.Conflict` if the id is taken."""

        def run(conn: sqlite3.Connection) -> SandboxRow:
            try:
                conn.execute(_INSERT_SANDBOX, row_to_params(row))
            except sqlite3.IntegrityError as exc:
                if _get(conn, row.id) is not None:
                    raise errors.Conflict(f"sandbox {row.id} already exists") from exc
                raise
            return _require(conn, row.id)

        return await self._call(run)

    async def get(self, sandbox_id: str) -> SandboxRow | None:
        return await self._call(lambda conn: _get(conn, sandbox_id))

    async def list(
        self,
        *,
        states: Collection[str] | None = None,
        metadata: Mapping[str, str] | None = None,
        expires_before: datetime | None = None,
        tenant_id: str | None = None,
    ) -> builtins.list[SandboxRow]:
        """Sandboxes, oldest first, filtered by state, metadata ``key=value`` pairs
        (all must match), expiry and owner."""
        where, params = _filters(states, metadata, expires_before, tenant_id)
        sql = f"{_SELECT_SANDBOX}{where} ORDER BY created_at, id"

        def run(conn: sqlite3.Connection) -> builtins.list[SandboxRow]:
            return [sandbox_from_db(values) for values in conn.execute(sql, params)]

        return await self._call(run)

    async def count(self, *, states: Collection[str] | None = None) -> int:
        where, params = _filters(states, None, None, None)

        def run(conn: sqlite3.Connection) -> int:
            cursor = conn.execute(f"SELECT count(*) FROM sandboxes{where}", params)  # noqa: S608
            return int(cursor.fetchone()[0])

        return await self._call(run)

    async def update(self, sandbox_id: str, **fields: Unpack[SandboxFields]) -> SandboxRow:
        """Change some columns; :class:`errors.NotFound` if there is no such sandbox."""

        def run(conn: sqlite3.Connection) -> SandboxRow:
            with transaction(conn):
                _require(conn, sandbox_id)
                _set(conn, sandbox_id, dict(fields))
                return _require(conn, sandbox_id)

        return await self._call(run)

    async def transition(
        self,
        sandbox_id: str,
        from_states: Collection[str],
        to_state: str,
        **fields: Unpack[SandboxFields],
    ) -> SandboxRow:
        """Atomic compare-and-set: move to ``to_state`` (and set ``fields``) only if the
        sandbox is in one of ``from_states``.

        Raises :class:`errors.NotFound` for an unknown id and :class:`errors.Conflict`
        ("sandbox X is stopped; cannot move to running") when the state did not match.
        """
        allowed = {encode_value(s) for s in from_states}
        target = encode_value(to_state)

        def run(conn: sqlite3.Connection) -> SandboxRow:
            with transaction(conn):
                current = _require(conn, sandbox_id)
                if current.state not in allowed:
                    raise errors.Conflict(
                        f"sandbox {sandbox_id} is {current.state}; cannot move to {target}",
                        sandbox_id=sandbox_id,
                        state=current.state,
                        target=target,
                    )
                _set(conn, sandbox_id, {**fields, "state": target})
                return _require(conn, sandbox_id)

        return await self._call(run)

    async def delete(self, sandbox_id: str) -> bool:
        """Remove a sandbox and its exec log; False if it was not there."""

        def run(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute("DELETE FROM sandboxes WHERE id = ?", (sandbox_id,))
            return cursor.rowcount > 0

        return await self._call(run)

    # -- exec log ----------------------------------------------------------------------

    async def log_exec(self, entry: ExecLogEntry) -> ExecLogEntry:
        """Append to the exec log; returns the entry with its id."""

        def run(conn: sqlite3.Connection) -> ExecLogEntry:
            cursor = conn.execute(
                "INSERT INTO exec_log (sandbox_id, command, exit_code, duration_ms, timed_out,"
                " started_at) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    entry.sandbox_id,
                    json.dumps(entry.command),  # a list is argv, a string a shell line
                    entry.exit_code,
                    entry.duration_ms,
                    int(entry.timed_out),
                    encode_time(entry.started_at),
                ),
            )
            values = conn.execute(f"{_SELECT_EXEC} WHERE id = ?", (cursor.lastrowid,)).fetchone()
            return exec_from_db(values)

        return await self._call(run)

    async def exec_log(self, sandbox_id: str) -> builtins.list[ExecLogEntry]:
        """A sandbox's commands, oldest first."""

        def run(conn: sqlite3.Connection) -> builtins.list[ExecLogEntry]:
            sql = f"{_SELECT_EXEC} WHERE sandbox_id = ? ORDER BY id"
            return [exec_from_db(values) for values in conn.execute(sql, (sandbox_id,))]

        return await self._call(run)

    # -- snapshots -----------------------------------------------------------------------

    async def insert_snapshot(
        self, row: SnapshotRow, *, tenant_max: int | None = None
    ) -> SnapshotRow:
        """Insert a snapshot; with ``tenant_max``, atomically refuse (QuotaExceeded) when
        its tenant holds that many already."""

        def run(conn: sqlite3.Connection) -> SnapshotRow:
            with transaction(conn):
                if tenant_max is not None:
                    held = tenants.snapshot_count(conn, row.tenant_id)
                    if held >= tenant_max:
                        raise errors.QuotaExceeded(
                            f"tenant quota max_snapshots={tenant_max} exceeded: the tenant "
                            f"holds {held} snapshots; delete one first",
                            quota="max_snapshots",
                            limit=tenant_max,
                            used=held,
                        )
                conn.execute(_INSERT_SNAPSHOT, snapshot_to_params(row))
            return row

        return await self._call(run)

    async def get_snapshot(self, snapshot_id: str) -> SnapshotRow | None:
        def run(conn: sqlite3.Connection) -> SnapshotRow | None:
            values = conn.execute(f"{_SELECT_SNAPSHOT} WHERE id = ?", (snapshot_id,)).fetchone()
            return snapshot_from_db(values) if values is not None else None

        return await self._call(run)

    async def list_snapshots(
        self, sandbox_id: str | None = None, *, tenant_id: str | None = None
    ) -> builtins.list[SnapshotRow]:
        """Snapshots, oldest first; only those taken of ``sandbox_id`` and owned by
        ``tenant_id`` when given."""
        wanted = {"sandbox_id": sandbox_id, "tenant_id": tenant_id}
        clauses = [f"{name} = ?" for name, value in wanted.items() if value]  # fixed names
        params = [value for value in wanted.values() if value]
        where = " WHERE " + " AND ".join(clauses) if clauses else ""
        sql = f"{_SELECT_SNAPSHOT}{where} ORDER BY created_at, id"

        def run(conn: sqlite3.Connection) -> builtins.list[SnapshotRow]:
            return [snapshot_from_db(values) for values in conn.execute(sql, params)]

        return await self._call(run)

    async def delete_snapshot(self, snapshot_id: str, *, unless_used_in: Collection[str]) -> None:
        """Delete a snapshot row, atomically refusing (:class:`errors.Conflict`) while a
        sandbox in one of the states ``unless_used_in`` was forked from it, or another
        snapshot was taken of such a fork."""
        states = sorted({encode_value(s) for s in unless_used_in})
        marks = ", ".join("?" for _ in states)
        in_use_sql = f"SELECT id FROM sandboxes WHERE snapshot_id = ? AND state IN ({marks})"  # noqa: S608

        # A snapshot of a fork has its disk layered on the fork's snapshot: keep that too.
        child_sql = (
            "SELECT s.id FROM snapshots s JOIN sandboxes b ON s.sandbox_id = b.id"
            " WHERE b.snapshot_id = ?"
        )

        def run(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                users = [r[0] for r in conn.execute(in_use_sql, (snapshot_id, *states))]
                users += [f"(snapshot {r[0]})" for r in conn.execute(child_sql, (snapshot_id,))]
                if users:
                    raise errors.Conflict(
                        f"snapshot {snapshot_id} is in use by {', '.join(users)}: "
                        "kill those sandboxes and delete those snapshots first",
                        snapshot_id=snapshot_id,
                        sandboxes=users,
                    )
                deleted = conn.execute("DELETE FROM snapshots WHERE id = ?", (snapshot_id,))
                if deleted.rowcount == 0:
                    raise errors.NotFound(f"no snapshot {snapshot_id}", snapshot_id=snapshot_id)

        await self._call(run)

    async def schema_version(self) -> int:
        return await self._call(migrations.schema_version)

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a blocking function of :mod:`emberbox.store.tenants` on the connection."""
        return await self._call(fn)

    # -- plumbing ----------------------------------------------------------------------

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        async with self._lock:
            if self._conn is None:
                raise errors.EmberboxError(f"the store {self.path} is closed")
            # Not abandoned on cancellation: the lock is held until the thread is done
            # with the connection.
            with storage_full_errors(self.path):
                return await anyio.to_thread.run_sync(fn, self._conn)


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating 0700/0600 if new), configure and migrate the database. Blocking."""
    _prepare_files(path)
    conn = sqlite3.connect(
        path,
        timeout=BUSY_TIMEOUT_MS / 1000,
        isolation_level=None,
        check_same_thread=False,
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise errors.HostError(f"{path}: SQLite refused WAL mode (got {mode!r})")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        migrations.migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def _prepare_files(path: Path) -> None:
    """Make the directory 0700 and the file 0600 when we create them, before SQLite does
    (SQLite gives its -wal and -shm files the database file's mode)."""
    parent = path.parent
    if not parent.exists():
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(parent, 0o700)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        # Never open (and close) a file another connection of this process may hold:
        # closing any descriptor of it drops all of the process's POSIX locks on it, and
        # SQLite then no longer excludes other processes (a corrupt database).
        os.chmod(path, 0o600)
        return
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


@contextlib.contextmanager
def storage_full_errors(path: Path) -> Iterator[None]:
    """SQLITE_FULL and ENOSPC become StorageFull (HTTP 507): the write did not happen
    (SQLite rolled it back), the database stays consistent, and it works again once
    space is freed."""
    try:
        yield
    except sqlite3.Error as exc:
        if getattr(exc, "sqlite_errorcode", None) != sqlite3.SQLITE_FULL:
            raise
        raise errors.StorageFull(f"{path}: no space left for the database") from exc
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise errors.StorageFull(f"{path}: no space left for the database") from exc


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any error) on an autocommit
    connection: atomic against other processes too."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # SQLite may have rolled back already (e.g. SQLITE_FULL)
            conn.execute("ROLLBACK")
        raise


def _get(conn: sqlite3.Connection, sandbox_id: str) -> SandboxRow | None:
    values = conn.execute(f"{_SELECT_SANDBOX} WHERE id = ?", (sandbox_id,)).fetchone()
    return sandbox_from_db(values) if values is not None else None


def _require(conn: sqlite3.Connection, sandbox_id: str) -> SandboxRow:
    row = _get(conn, sandbox_id)
    if row is None:
        raise errors.NotFound(f"no sandbox {sandbox_id}", sandbox_id=sandbox_id)
    return row


def _set(conn: sqlite3.Connection, sandbox_id: str, fields: Mapping[str, Any]) -> None:
    unknown = set(fields) - UPDATABLE_COLUMNS
    if unknown:
        raise ValueError(f"cannot update sandbox columns {sorted(unknown)}")
    changes = {name: encode_value(value) for name, value in fields.items()}
    changes["updated_at"] = encode_time(utcnow())
    assignments = ", ".join(f"{name} = ?" for name in changes)  # names are whitelisted
    conn.execute(
        f"UPDATE sandboxes SET {assignments} WHERE id = ?",  # noqa: S608
        (*changes.values(), sandbox_id),
    )


def _filters(
    states: Collection[str] | None,
    metadata: Mapping[str, str] | None,
    expires_before: datetime | None,
    tenant_id: str | None,
) -> tuple[str, builtins.list[Any]]:
    clauses: builtins.list[str] = []
    params: builtins.list[Any] = []
    if states is not None:
        wanted = sorted({encode_value(s) for s in states})
        if not wanted:
            return " WHERE 0", []
        clauses.append(f"state IN ({', '.join('?' for _ in wanted)})")
        params.extend(wanted)
    for key, value in sorted((metadata or {}).items()):
        # json_each rather than json_extract: any key works, no JSON-path quoting.
        clauses.append(
            "EXISTS (SELECT 1 FROM json_each(sandboxes.metadata)"
            " WHERE json_each.key = ? AND json_each.type = 'text' AND json_each.value = ?)"
        )
        params.extend((key, value))
    if expires_before is not None:
        clauses.append("expires_at < ?")
        params.append(encode_time(expires_before))
    if tenant_id is not None:
        clauses.append("tenant_id = ?")
        params.append(tenant_id)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params
