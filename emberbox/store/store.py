"""The sandbox database as the server uses it: :class:`Store`, asynchronous.

One connection (:func:`emberbox.store.db.connect`). Every call runs in a worker thread
(``anyio.to_thread``) behind an :class:`anyio.Lock`, so the connection is used by one
thread at a time and the event loop never blocks on disk. The SQL itself is in
:mod:`~emberbox.store.sandboxes` (with the exec log), :mod:`~emberbox.store.snapshots`
and :mod:`~emberbox.store.tenants`.
"""

from __future__ import annotations

import builtins
import sqlite3
from collections.abc import Callable, Collection, Mapping
from datetime import datetime
from pathlib import Path
from typing import TypeVar, Unpack

import anyio
import anyio.to_thread

from emberbox import errors
from emberbox.store import migrations, sandboxes, snapshots
from emberbox.store.db import connect, storage_full_errors
from emberbox.store.records import ExecLogEntry, SandboxFields, SandboxRow, SnapshotRow

T = TypeVar("T")


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
    ) -> builtins.list[SandboxRow]:
        """Sandboxes, oldest first, filtered by state, metadata ``key=value`` pairs
        (all must match), expiry and owner."""
        return await self._call(
            lambda conn: sandboxes.list_sandboxes(
                conn,
                states=states,
                metadata=metadata,
                expires_before=expires_before,
                tenant_id=tenant_id,
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
