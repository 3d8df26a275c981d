"""The cluster's hosts (docs/cluster.md) and the sandboxes lost with one: blocking SQL.

A row per host server the API replicas know of: where it listens (``url``; its key is
never stored), the Ray node it runs on, whether it is up and whether an operator drains
it. :func:`mark_lost` moves a dead host's sandboxes to ``lost`` in one statement, so
replicas that notice the death together do it once. A single host never writes here.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from emberbox import errors
from emberbox.store.connection import Connection
from emberbox.store.records import decode_time, encode_time, encode_value, utcnow

LOST_STATE = "lost"
HOST_STATES = ("up", "down")
_COLUMNS = ("name", "url", "node_id", "state", "draining", "updated_at")
_SELECT_HOST = f"SELECT {', '.join(_COLUMNS)} FROM hosts"  # noqa: S608
_UPSERT_HOST = (
    f"INSERT INTO hosts ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' for _ in _COLUMNS)})"  # noqa: S608
    " ON CONFLICT (name) DO UPDATE SET "
    + ", ".join(f"{name} = excluded.{name}" for name in _COLUMNS[1:])
)


@dataclass(frozen=True)
class HostRow:
    """One row of ``hosts``."""

    name: str
    url: str | None = None  # the host server's base URL
    node_id: str | None = None  # the Ray node it runs on
    state: str = "up"  # "up" or "down"
    draining: bool = False  # takes no new sandboxes
    updated_at: datetime = field(default_factory=utcnow)


def upsert_host(conn: Connection, row: HostRow) -> HostRow:
    """Insert the host, or overwrite every column of the one with that name."""
    _check_state(row.state)
    conn.execute(
        _UPSERT_HOST,
        (
            row.name,
            row.url,
            row.node_id,
            row.state,
            int(row.draining),
            encode_time(row.updated_at),
        ),
    )
    return _require(conn, row.name)


def get_host(conn: Connection, name: str) -> HostRow | None:
    values = conn.execute(f"{_SELECT_HOST} WHERE name = ?", (name,)).fetchone()
    return _host(values) if values is not None else None


def list_hosts(conn: Connection) -> list[HostRow]:
    return [_host(values) for values in conn.execute(f"{_SELECT_HOST} ORDER BY name", ())]


def set_host(
    conn: Connection, name: str, *, state: str | None = None, draining: bool | None = None
) -> HostRow:
    """Change a host's state and/or draining flag (and its ``updated_at``);
    :class:`errors.NotFound` for an unknown host."""
    changes: dict[str, Any] = {"updated_at": encode_time(utcnow())}
    if state is not None:
        _check_state(state)
        changes["state"] = state
    if draining is not None:
        changes["draining"] = int(draining)
    assignments = ", ".join(f"{column} = ?" for column in changes)  # fixed names
    cursor = conn.execute(
        f"UPDATE hosts SET {assignments} WHERE name = ?",  # noqa: S608
        (*changes.values(), name),
    )
    if cursor.rowcount == 0:
        raise errors.NotFound(f"no host {name}", host=name)
    return _require(conn, name)


def mark_lost(conn: Connection, host: str, from_states: Collection[str]) -> list[str]:
    """Move ``host``'s sandboxes that are in one of ``from_states`` to ``lost``; their
    ids, sorted. One statement: atomic, and a second replica doing the same finds none."""
    states = sorted({encode_value(s) for s in from_states})
    if not states:
        return []
    marks = ", ".join("?" for _ in states)
    cursor = conn.execute(
        f"UPDATE sandboxes SET state = ?, updated_at = ?"  # noqa: S608
        f" WHERE host = ? AND state IN ({marks}) RETURNING id",
        (LOST_STATE, encode_time(utcnow()), host, *states),
    )
    return sorted(str(values[0]) for values in cursor.fetchall())


def count_by_host(conn: Connection, states: Collection[str]) -> dict[str, int]:
    """Sandboxes in one of ``states`` per host (hosts with none are left out)."""
    wanted = sorted({encode_value(s) for s in states})
    if not wanted:
        return {}
    marks = ", ".join("?" for _ in wanted)
    cursor = conn.execute(
        f"SELECT host, count(*) FROM sandboxes"  # noqa: S608
        f" WHERE host IS NOT NULL AND state IN ({marks}) GROUP BY host",
        tuple(wanted),
    )
    return {str(host): int(count) for host, count in cursor.fetchall()}


def _check_state(state: str) -> None:
    if state not in HOST_STATES:
        raise ValueError(f"host state must be one of {HOST_STATES}, not {state!r}")


def _require(conn: Connection, name: str) -> HostRow:
    row = get_host(conn, name)
    if row is None:
        raise errors.NotFound(f"no host {name}", host=name)
    return row


def _host(values: tuple[Any, ...]) -> HostRow:
    raw = dict(zip(_COLUMNS, values, strict=True))
    return HostRow(
        **{**raw, "draining": bool(raw["draining"]), "updated_at": decode_time(raw["updated_at"])}
    )
