"""Snapshots: blocking SQL on a connection.

:class:`~emberbox.store.store.Store` runs these in its worker thread, one at a time.
The checks that guard a write (the tenant's quota, the sandboxes and snapshots that
still depend on a snapshot) run in the same :func:`~emberbox.store.db.transaction` as
the write, so no other process (or API replica) slips in between.
"""

from __future__ import annotations

from collections.abc import Collection

from emberbox import errors
from emberbox.store import tenants
from emberbox.store.connection import Connection
from emberbox.store.db import transaction
from emberbox.store.records import (
    SNAPSHOT_COLUMNS,
    SnapshotRow,
    encode_value,
    snapshot_from_db,
    snapshot_to_params,
)

# Statements built from fixed column names only; values always go through "?".
_SELECT_SNAPSHOT = f"SELECT {', '.join(SNAPSHOT_COLUMNS)} FROM snapshots"  # noqa: S608
_INSERT_SNAPSHOT = (
    f"INSERT INTO snapshots ({', '.join(SNAPSHOT_COLUMNS)}) "  # noqa: S608
    f"VALUES ({', '.join('?' for _ in SNAPSHOT_COLUMNS)})"
)
# A snapshot of a fork has its disk layered on the fork's snapshot: keep that too.
_CHILDREN = (
    "SELECT s.id FROM snapshots s JOIN sandboxes b ON s.sandbox_id = b.id WHERE b.snapshot_id = ?"
)


def insert_snapshot(conn: Connection, row: SnapshotRow, tenant_max: int | None) -> SnapshotRow:
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


def get_snapshot(conn: Connection, snapshot_id: str) -> SnapshotRow | None:
    values = conn.execute(f"{_SELECT_SNAPSHOT} WHERE id = ?", (snapshot_id,)).fetchone()
    return snapshot_from_db(values) if values is not None else None


def list_snapshots(
    conn: Connection, sandbox_id: str | None, tenant_id: str | None
) -> list[SnapshotRow]:
    wanted = {"sandbox_id": sandbox_id, "tenant_id": tenant_id}
    clauses = [f"{name} = ?" for name, value in wanted.items() if value]  # fixed names
    params = [value for value in wanted.values() if value]
    where = " WHERE " + " AND ".join(clauses) if clauses else ""
    sql = f"{_SELECT_SNAPSHOT}{where} ORDER BY created_at, id"
    return [snapshot_from_db(values) for values in conn.execute(sql, params)]


def delete_snapshot(conn: Connection, snapshot_id: str, unless_used_in: Collection[str]) -> None:
    states = sorted({encode_value(s) for s in unless_used_in})
    marks = ", ".join("?" for _ in states)
    in_use_sql = f"SELECT id FROM sandboxes WHERE snapshot_id = ? AND state IN ({marks})"  # noqa: S608
    with transaction(conn):
        users = [r[0] for r in conn.execute(in_use_sql, (snapshot_id, *states))]
        users += [f"(snapshot {r[0]})" for r in conn.execute(_CHILDREN, (snapshot_id,))]
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
