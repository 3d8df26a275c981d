"""Sandboxes and the commands they ran: blocking SQL on a connection.

:class:`~emberbox.store.store.Store` runs these in its worker thread, one at a time.
Writes that read first (update, transition) run in one
:func:`~emberbox.store.db.transaction`, so they are atomic against other processes (and,
on PostgreSQL, other API replicas) too. Deleting a sandbox deletes its exec log
(a foreign key with ``ON DELETE CASCADE``).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from datetime import datetime
from typing import Any

from emberbox import errors
from emberbox.store.connection import Connection, is_postgres
from emberbox.store.db import integrity_errors, transaction
from emberbox.store.records import (
    SANDBOX_COLUMNS,
    UPDATABLE_COLUMNS,
    ExecLogEntry,
    SandboxRow,
    encode_time,
    encode_value,
    exec_from_db,
    row_to_params,
    sandbox_from_db,
    utcnow,
)

# Statements built from fixed column names only; values always go through "?".
_COLUMNS = ", ".join(SANDBOX_COLUMNS)
_MARKS = ", ".join("?" for _ in SANDBOX_COLUMNS)
_SELECT_SANDBOX = f"SELECT {_COLUMNS} FROM sandboxes"  # noqa: S608
_INSERT_SANDBOX = f"INSERT INTO sandboxes ({_COLUMNS}) VALUES ({_MARKS})"  # noqa: S608
# One metadata pair (key, value as a JSON string) must match. SQLite: json_each rather
# than json_extract (any key works, no JSON-path quoting); PostgreSQL: jsonb containment.
_METADATA_SQLITE = (
    "EXISTS (SELECT 1 FROM json_each(sandboxes.metadata)"
    " WHERE json_each.key = ? AND json_each.type = 'text' AND json_each.value = ?)"
)
_METADATA_PG = "sandboxes.metadata::jsonb @> CAST(? AS jsonb)"
_SELECT_EXEC = (
    "SELECT id, sandbox_id, command, exit_code, duration_ms, timed_out, started_at FROM exec_log"
)


# --- sandboxes ------------------------------------------------------------------------


def insert_sandbox(conn: Connection, row: SandboxRow) -> SandboxRow:
    try:
        # In a transaction: a fork's insert never slips between delete_snapshot's check
        # and its delete (on SQLite every write is serialized anyway; on PostgreSQL only
        # what holds the store's lock is).
        with transaction(conn):
            conn.execute(_INSERT_SANDBOX, row_to_params(row))
    except integrity_errors(conn) as exc:
        if get_sandbox(conn, row.id) is not None:
            raise errors.Conflict(f"sandbox {row.id} already exists") from exc
        raise
    return _require(conn, row.id)


def get_sandbox(conn: Connection, sandbox_id: str) -> SandboxRow | None:
    values = conn.execute(f"{_SELECT_SANDBOX} WHERE id = ?", (sandbox_id,)).fetchone()
    return sandbox_from_db(values) if values is not None else None


def list_sandboxes(
    conn: Connection,
    *,
    states: Collection[str] | None,
    metadata: Mapping[str, str] | None,
    expires_before: datetime | None,
    tenant_id: str | None,
    host: str | None = None,
) -> list[SandboxRow]:
    where, params = _filters(conn, states, metadata, expires_before, tenant_id, host)
    sql = f"{_SELECT_SANDBOX}{where} ORDER BY created_at, id"
    return [sandbox_from_db(values) for values in conn.execute(sql, params)]


def count_sandboxes(conn: Connection, *, states: Collection[str] | None) -> int:
    where, params = _filters(conn, states, None, None, None, None)
    cursor = conn.execute(f"SELECT count(*) FROM sandboxes{where}", params)  # noqa: S608
    return int(cursor.fetchone()[0])


def update_sandbox(conn: Connection, sandbox_id: str, fields: Mapping[str, Any]) -> SandboxRow:
    with transaction(conn):
        _require(conn, sandbox_id)
        _set(conn, sandbox_id, fields)
        return _require(conn, sandbox_id)


def transition(
    conn: Connection,
    sandbox_id: str,
    from_states: Collection[str],
    to_state: str,
    fields: Mapping[str, Any],
) -> SandboxRow:
    allowed = {encode_value(s) for s in from_states}
    target = encode_value(to_state)
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


def delete_sandbox(conn: Connection, sandbox_id: str) -> bool:
    cursor = conn.execute("DELETE FROM sandboxes WHERE id = ?", (sandbox_id,))
    return cursor.rowcount > 0


def _require(conn: Connection, sandbox_id: str) -> SandboxRow:
    row = get_sandbox(conn, sandbox_id)
    if row is None:
        raise errors.NotFound(f"no sandbox {sandbox_id}", sandbox_id=sandbox_id)
    return row


def _set(conn: Connection, sandbox_id: str, fields: Mapping[str, Any]) -> None:
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
    conn: Connection,
    states: Collection[str] | None,
    metadata: Mapping[str, str] | None,
    expires_before: datetime | None,
    tenant_id: str | None,
    host: str | None,
) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if states is not None:
        wanted = sorted({encode_value(s) for s in states})
        if not wanted:
            return " WHERE 1 = 0", []
        clauses.append(f"state IN ({', '.join('?' for _ in wanted)})")
        params.extend(wanted)
    for key, value in sorted((metadata or {}).items()):
        clauses.append(_METADATA_PG if is_postgres(conn) else _METADATA_SQLITE)
        params.extend(_metadata_params(conn, key, value))
    if expires_before is not None:
        clauses.append("expires_at < ?")
        params.append(encode_time(expires_before))
    if tenant_id is not None:
        clauses.append("tenant_id = ?")
        params.append(tenant_id)
    if host is not None:
        clauses.append("host = ?")
        params.append(host)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def _metadata_params(conn: Connection, key: str, value: str) -> tuple[Any, ...]:
    if is_postgres(conn):
        return (json.dumps({key: value}),)
    return (key, value)


# --- the exec log ---------------------------------------------------------------------


def insert_exec(conn: Connection, entry: ExecLogEntry) -> ExecLogEntry:
    cursor = conn.execute(
        "INSERT INTO exec_log (sandbox_id, command, exit_code, duration_ms, timed_out,"
        " started_at) VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
        (
            entry.sandbox_id,
            json.dumps(entry.command),  # a list is argv, a string a shell line
            entry.exit_code,
            entry.duration_ms,
            int(entry.timed_out),
            encode_time(entry.started_at),
        ),
    )
    new_id = cursor.fetchall()[0][0]  # to the end: SQLite commits the insert then
    values = conn.execute(f"{_SELECT_EXEC} WHERE id = ?", (new_id,)).fetchone()
    return exec_from_db(values)


def list_execs(conn: Connection, sandbox_id: str) -> list[ExecLogEntry]:
    sql = f"{_SELECT_EXEC} WHERE sandbox_id = ? ORDER BY id"
    return [exec_from_db(values) for values in conn.execute(sql, (sandbox_id,))]


# --- retention ------------------------------------------------------------------------


def prune_history(
    conn: Connection, *, ended_before: datetime, execs_before: datetime, max_execs: int
) -> tuple[int, int]:
    """Forget sandboxes that ended (stopped or error) before ``ended_before`` and that no
    snapshot names, with their exec logs; exec log entries started before
    ``execs_before``, and all but the newest ``max_execs``. (sandboxes, entries) gone."""
    ended = conn.execute(
        "DELETE FROM sandboxes WHERE state IN ('stopped', 'error') AND updated_at < ?"
        " AND id NOT IN (SELECT sandbox_id FROM snapshots)",
        (encode_time(ended_before),),
    ).rowcount
    execs = conn.execute(
        "DELETE FROM exec_log WHERE started_at < ?", (encode_time(execs_before),)
    ).rowcount
    cut = conn.execute(
        "SELECT id FROM exec_log ORDER BY id DESC LIMIT 1 OFFSET ?", (max_execs,)
    ).fetchone()
    if cut is not None:
        execs += conn.execute("DELETE FROM exec_log WHERE id <= ?", (cut[0],)).rowcount
    return int(ended), int(execs)
