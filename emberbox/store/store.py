"""The sandbox database as the server uses it: :class:`Store`, asynchronous.

One connection: SQLite (:func:`emberbox.store.db.connect`, a single host) or, for a
``postgresql://`` URL, PostgreSQL (:func:`emberbox.store.postgres.connect`, a cluster's
API replicas). Every call runs in a worker thread (``anyio.to_thread``) behind an
:class:`anyio.Lock`, so the connection is used by one thread at a time and the event
loop never blocks on I/O; a PostgreSQL connection that broke is opened again on the
next call. The SQL itself is in :mod:`~emberbox.store.sandboxes` (with the exec log),
:mod:`~emberbox.store.snapshots`, :mod:`~emberbox.store.tenants` and
:mod:`~emberbox.store.hosts`, the same for both backends.
"""

from __future__ import annotations

import builtins
import contextlib
from collections.abc import Callable, Collection, Mapping
from datetime import datetime
from pathlib import Path
from typing import Protocol, TypeVar, Unpack

import anyio
import anyio.to_thread

from emberbox import errors
from emberbox.store import hosts, migrations, sandboxes, snapshots
from emberbox.store.connection import Connection
from emberbox.store.db import SqliteBackend
from emberbox.store.hosts import HostRow
from emberbox.store.postgres import PgBackend, is_postgres_url
from emberbox.store.records import ExecLogEntry, SandboxFields, SandboxRow, SnapshotRow

T = TypeVar("T")


class Backend(Protocol):
    """How a store opens its database, names it in messages and maps its errors."""

    where: str  # the path, or the URL without its password

    def connect(self) -> Connection: ...

    def errors(self) -> contextlib.AbstractContextManager[None]: ...

    def broken(self, conn: Connection) -> bool: ...


def backend_for(target: Path | str) -> Backend:
    """PostgreSQL for a ``postgresql://`` URL, else SQLite at the path ``target``."""
    if is_postgres_url(target):
        return PgBackend(str(target))
    return SqliteBackend(Path(target))


class Store:
    """The sandbox database. Open with :meth:`open`; :meth:`close` is idempotent."""

    def __init__(self, backend: Backend, conn: Connection) -> None:
        self.backend = backend
        self.where = backend.where
        self._conn: Connection | None = conn
        self._lock = anyio.Lock()

    @classmethod
    async def open(cls, target: Path | str) -> Store:
        """Open the database and bring its schema up to date: a ``postgresql://`` URL is
        PostgreSQL (HostError when unreachable), anything else a SQLite file (created
        0600 in a 0700 dir)."""
        backend = backend_for(target)
        with backend.errors():
            conn = await anyio.to_thread.run_sync(backend.connect)
        return cls(backend, conn)

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
        return await self._call(lambda conn: sandboxes.insert_sandbox(conn, row))

    async def get(self, sandbox_id: str) -> SandboxRow | None:
        return await self._call(lambda conn: sandboxes.get_sandbox(conn, sandbox_id))

    async def list(
        self,
        *,
        states: Collection[str] | None = None,
        metadata: Mapping[str, str] | None = None,
        expires_before: datetime | None = None,
        tenant_id: str | None = None,
        host: str | None = None,
    ) -> builtins.list[SandboxRow]:
        """Sandboxes, oldest first, filtered by state, metadata ``key=value`` pairs
        (all must match), expiry, owner and (cluster) host."""
        return await self._call(
            lambda conn: sandboxes.list_sandboxes(
                conn,
                states=states,
                metadata=metadata,
                expires_before=expires_before,
                tenant_id=tenant_id,
                host=host,
            )
        )

    async def count(self, *, states: Collection[str] | None = None) -> int:
        return await self._call(lambda conn: sandboxes.count_sandboxes(conn, states=states))

    async def update(self, sandbox_id: str, **fields: Unpack[SandboxFields]) -> SandboxRow:
        """Change some columns; :class:`errors.NotFound` if there is no such sandbox."""
        changes = dict(fields)
        return await self._call(lambda conn: sandboxes.update_sandbox(conn, sandbox_id, changes))

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
        changes = dict(fields)
        return await self._call(
            lambda conn: sandboxes.transition(conn, sandbox_id, from_states, to_state, changes)
        )

    async def delete(self, sandbox_id: str) -> bool:
        """Remove a sandbox and its exec log; False if it was not there."""
        return await self._call(lambda conn: sandboxes.delete_sandbox(conn, sandbox_id))

    # -- exec log ----------------------------------------------------------------------

    async def log_exec(self, entry: ExecLogEntry) -> ExecLogEntry:
        """Append to the exec log; returns the entry with its id."""
        return await self._call(lambda conn: sandboxes.insert_exec(conn, entry))

    async def exec_log(self, sandbox_id: str) -> builtins.list[ExecLogEntry]:
        """A sandbox's commands, oldest first."""
        return await self._call(lambda conn: sandboxes.list_execs(conn, sandbox_id))

    # -- snapshots -----------------------------------------------------------------------

    async def insert_snapshot(
        self, row: SnapshotRow, *, tenant_max: int | None = None
    ) -> SnapshotRow:
        """Insert a snapshot; with ``tenant_max``, atomically refuse (QuotaExceeded) when
        its tenant holds that many already."""
        return await self._call(lambda conn: snapshots.insert_snapshot(conn, row, tenant_max))

    async def get_snapshot(self, snapshot_id: str) -> SnapshotRow | None:
        return await self._call(lambda conn: snapshots.get_snapshot(conn, snapshot_id))

    async def list_snapshots(
        self, sandbox_id: str | None = None, *, tenant_id: str | None = None
    ) -> builtins.list[SnapshotRow]:
        """Snapshots, oldest first; only those taken of ``sandbox_id`` and owned by
        ``tenant_id`` when given."""
        return await self._call(lambda conn: snapshots.list_snapshots(conn, sandbox_id, tenant_id))

    async def delete_snapshot(self, snapshot_id: str, *, unless_used_in: Collection[str]) -> None:
        """Delete a snapshot row, atomically refusing (:class:`errors.Conflict`) while a
        sandbox in one of the states ``unless_used_in`` was forked from it, or another
        snapshot was taken of such a fork."""
        await self._call(lambda conn: snapshots.delete_snapshot(conn, snapshot_id, unless_used_in))

    # -- hosts (cluster) -----------------------------------------------------------------

    async def upsert_host(self, row: HostRow) -> HostRow:
        """Insert a host or overwrite every column of the one with its name."""
        return await self._call(lambda conn: hosts.upsert_host(conn, row))

    async def list_hosts(self) -> builtins.list[HostRow]:
        """Every known host, by name."""
        return await self._call(hosts.list_hosts)

    async def get_host(self, name: str) -> HostRow | None:
        return await self._call(lambda conn: hosts.get_host(conn, name))

    async def set_host(
        self, name: str, *, state: str | None = None, draining: bool | None = None
    ) -> HostRow:
        """Change a host's ``state`` ("up"/"down") and/or ``draining``;
        :class:`errors.NotFound` for an unknown host."""
        return await self._call(
            lambda conn: hosts.set_host(conn, name, state=state, draining=draining)
        )

    async def mark_lost(self, host: str, from_states: Collection[str]) -> builtins.list[str]:
        """Move ``host``'s sandboxes in ``from_states`` to ``lost``; the ids moved."""
        return await self._call(lambda conn: hosts.mark_lost(conn, host, from_states))

    async def schema_version(self) -> int:
        return await self._call(migrations.schema_version)

    async def call(self, fn: Callable[[Connection], T]) -> T:
        """Run a blocking function of :mod:`emberbox.store.tenants` on the connection."""
        return await self._call(fn)

    # -- plumbing ----------------------------------------------------------------------

    async def _call(self, fn: Callable[[Connection], T]) -> T:
        async with self._lock:
            if self._conn is None:
                raise errors.EmberboxError(f"the store {self.where} is closed")
            # Not abandoned on cancellation: the lock is held until the thread is done
            # with the connection.
            with self.backend.errors():
                if self.backend.broken(self._conn):
                    await anyio.to_thread.run_sync(self._reconnect)
                return await anyio.to_thread.run_sync(fn, self._conn)

    def _reconnect(self) -> None:
        """(Blocking) a fresh connection for one that broke (PostgreSQL restarted, the
        network dropped): the call that broke it failed (HostError), the next one runs
        on a new connection."""
        fresh = self.backend.connect()
        old, self._conn = self._conn, fresh
        if old is not None:
            with contextlib.suppress(Exception):  # it is broken: closing may fail too
                old.close()
