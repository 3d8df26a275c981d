"""Tenants, their API keys and the audit log: typed rows and blocking SQL on a connection.

Both the server (through :meth:`Store.call`, in a worker thread) and the CLI (``emberbox
keys``, ``emberbox audit``, on its own connection while the server runs) use these. A key
row holds the SHA-256 of the key's secret, never the secret.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from emberbox import errors
from emberbox.store.connection import Connection
from emberbox.store.db import integrity_errors
from emberbox.store.records import LOCAL_TENANT_ID, decode_time, encode_time, utcnow

QUOTA_NAMES = ("max_sandboxes", "max_vcpus", "max_memory_mib", "max_snapshots")
_TENANT_COLUMNS = ("id", "name", "admin", *QUOTA_NAMES, "created_at")
_SELECT_TENANT = f"SELECT {', '.join(_TENANT_COLUMNS)} FROM tenants"  # noqa: S608
_KEY_COLUMNS = ("id", "tenant_id", "key_hash", "created_at", "last_used_at", "revoked_at")
_SELECT_KEY = f"SELECT {', '.join(_KEY_COLUMNS)} FROM api_keys"  # noqa: S608
_AUDIT_COLUMNS = ("id", "at", "tenant_id", "key_id", "action", "target_id", "detail", "outcome")
_SELECT_AUDIT = f"SELECT {', '.join(_AUDIT_COLUMNS)} FROM audit_log"  # noqa: S608


@dataclass(frozen=True)
class TenantRow:
    """One row of ``tenants``; a quota of None means the Settings default."""

    id: str
    name: str
    admin: bool
    created_at: datetime
    max_sandboxes: int | None = None
    max_vcpus: int | None = None
    max_memory_mib: int | None = None
    max_snapshots: int | None = None

    def overrides(self) -> dict[str, int]:
        """The quotas set for this tenant (the others come from Settings)."""
        found = {name: getattr(self, name) for name in QUOTA_NAMES}
        return {name: value for name, value in found.items() if value is not None}


@dataclass(frozen=True)
class KeyRow:
    """One row of ``api_keys``."""

    id: str
    tenant_id: str
    key_hash: str
    created_at: datetime
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None


@dataclass(frozen=True)
class AuditEntry:
    """One row of ``audit_log``: who (tenant, key), what, when and how it ended."""

    tenant_id: str
    action: str
    outcome: str  # "ok" or the error's class name
    at: datetime = field(default_factory=utcnow)
    key_id: str | None = None
    target_id: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    id: int | None = None  # assigned by the database


@dataclass(frozen=True)
class Usage:
    """What a tenant holds now: live sandboxes (creating or running) and snapshots."""

    sandboxes: int = 0
    vcpus: int = 0
    memory_mib: int = 0
    snapshots: int = 0


# -- tenants ---------------------------------------------------------------------------------


def insert_tenant(conn: Connection, row: TenantRow) -> TenantRow:
    """Add a tenant; :class:`errors.Conflict` when the name is taken."""
    values = (row.id, row.name, int(row.admin), *(getattr(row, n) for n in QUOTA_NAMES))
    try:
        conn.execute(
            f"INSERT INTO tenants ({', '.join(_TENANT_COLUMNS)}) "  # noqa: S608
            f"VALUES ({', '.join('?' for _ in _TENANT_COLUMNS)})",
            (*values, encode_time(row.created_at)),
        )
    except integrity_errors(conn) as exc:
        raise errors.Conflict(f"a tenant named {row.name!r} exists already") from exc
    return row


def update_tenant(
    conn: Connection, tenant_id: str, *, admin: bool | None, quotas: dict[str, int]
) -> None:
    """Set the admin flag (when not None) and the given quota overrides."""
    changes: dict[str, Any] = {name: quotas[name] for name in QUOTA_NAMES if name in quotas}
    if admin is not None:
        changes["admin"] = int(admin)
    if changes:
        assignments = ", ".join(f"{name} = ?" for name in changes)  # names are whitelisted
        conn.execute(
            f"UPDATE tenants SET {assignments} WHERE id = ?",  # noqa: S608
            (*changes.values(), tenant_id),
        )


def get_tenant(conn: Connection, tenant_id: str) -> TenantRow | None:
    values = conn.execute(f"{_SELECT_TENANT} WHERE id = ?", (tenant_id,)).fetchone()
    return _tenant(values) if values is not None else None


def tenant_by_name(conn: Connection, name: str) -> TenantRow | None:
    values = conn.execute(f"{_SELECT_TENANT} WHERE name = ?", (name,)).fetchone()
    return _tenant(values) if values is not None else None


def list_tenants(conn: Connection) -> list[TenantRow]:
    return [_tenant(values) for values in conn.execute(f"{_SELECT_TENANT} ORDER BY name")]


def usage(conn: Connection, tenant_id: str, live_states: Iterable[str]) -> Usage:
    """A tenant's live sandboxes (count, vCPUs, memory) and snapshots."""
    states = sorted(live_states)
    marks = ", ".join("?" for _ in states)
    sql = (
        "SELECT count(*), coalesce(sum(vcpus), 0), coalesce(sum(memory_mib), 0)"  # noqa: S608
        f" FROM sandboxes WHERE tenant_id = ? AND state IN ({marks})"
    )
    sandboxes, vcpus, memory = conn.execute(sql, (tenant_id, *states)).fetchone()
    snapshots = snapshot_count(conn, tenant_id)
    return Usage(int(sandboxes), int(vcpus), int(memory), snapshots)


def snapshot_count(conn: Connection, tenant_id: str) -> int:
    """A tenant's saved VMs: its snapshots and its paused sandboxes (each holds a RAM
    dump and a disk on the host)."""
    cursor = conn.execute(
        "SELECT (SELECT count(*) FROM snapshots WHERE tenant_id = ?)"
        " + (SELECT count(*) FROM sandboxes WHERE tenant_id = ? AND state = 'paused')",
        (tenant_id, tenant_id),
    )
    return int(cursor.fetchone()[0])


def owner_of(conn: Connection, table: str, object_id: str) -> str | None:
    """The tenant of a sandbox (``table="sandboxes"``) or a snapshot; None if unknown."""
    if table not in ("sandboxes", "snapshots"):
        raise ValueError(f"no owned table {table!r}")
    values = conn.execute(
        f"SELECT tenant_id FROM {table} WHERE id = ?",  # noqa: S608
        (object_id,),
    ).fetchone()
    return str(values[0]) if values is not None else None


# -- keys ------------------------------------------------------------------------------------


def insert_key(conn: Connection, row: KeyRow) -> KeyRow:
    conn.execute(
        "INSERT INTO api_keys (id, tenant_id, key_hash, created_at) VALUES (?, ?, ?, ?)",
        (row.id, row.tenant_id, row.key_hash, encode_time(row.created_at)),
    )
    return row


def key_with_tenant(conn: Connection, key_id: str) -> tuple[KeyRow, TenantRow] | None:
    """A key and its tenant, in one read."""
    key = conn.execute(f"{_SELECT_KEY} WHERE id = ?", (key_id,)).fetchone()
    if key is None:
        return None
    tenant = get_tenant(conn, key[1])
    return (_key(key), tenant) if tenant is not None else None


def list_keys(conn: Connection) -> list[KeyRow]:
    return [_key(values) for values in conn.execute(f"{_SELECT_KEY} ORDER BY created_at, id")]


def any_active_key(conn: Connection) -> bool:
    """Whether any key is still valid (then a request without one is refused)."""
    found = conn.execute("SELECT 1 FROM api_keys WHERE revoked_at IS NULL LIMIT 1").fetchone()
    return found is not None


def revoke_keys(conn: Connection, key_ids: Iterable[str], at: datetime) -> list[str]:
    """Revoke the still active keys among ``key_ids``; returns those revoked now."""
    revoked = []
    for key_id in key_ids:
        cursor = conn.execute(
            "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
            (encode_time(at), key_id),
        )
        if cursor.rowcount:
            revoked.append(key_id)
    return revoked


def touch_key(conn: Connection, key_id: str, at: datetime) -> None:
    conn.execute("UPDATE api_keys SET last_used_at = ? WHERE id = ?", (encode_time(at), key_id))


# -- audit log -------------------------------------------------------------------------------


def insert_audit(conn: Connection, entry: AuditEntry) -> None:
    conn.execute(
        "INSERT INTO audit_log (at, tenant_id, key_id, action, target_id, detail, outcome)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            encode_time(entry.at),
            entry.tenant_id,
            entry.key_id,
            entry.action,
            entry.target_id,
            bounded_detail(entry.detail),
            entry.outcome,
        ),
    )


AUDIT_DETAIL_MAX_BYTES = 4096  # a row's detail as stored; more is kept as a cut string


def bounded_detail(detail: dict[str, Any]) -> str:
    """``detail`` as JSON, or, past AUDIT_DETAIL_MAX_BYTES, its head as a string under
    ``"cut"`` (with the full size), so a row never holds a caller's bulk."""
    text = json.dumps(detail, sort_keys=True, separators=(",", ":"))
    if len(text.encode("utf-8")) <= AUDIT_DETAIL_MAX_BYTES:
        return text
    head = text.encode("utf-8")[: AUDIT_DETAIL_MAX_BYTES // 2].decode("utf-8", "ignore")
    return json.dumps({"cut": head, "bytes": len(text.encode("utf-8"))}, separators=(",", ":"))


def prune_audit(conn: Connection, *, before: datetime, keep_rows: int) -> int:
    """Delete entries older than ``before`` and all but the newest ``keep_rows``;
    how many went."""
    gone = conn.execute("DELETE FROM audit_log WHERE at < ?", (encode_time(before),)).rowcount
    cut = conn.execute(
        "SELECT id FROM audit_log ORDER BY id DESC LIMIT 1 OFFSET ?", (keep_rows,)
    ).fetchone()
    if cut is not None:
        gone += conn.execute("DELETE FROM audit_log WHERE id <= ?", (cut[0],)).rowcount
    return int(gone)


def list_audit(
    conn: Connection,
    *,
    tenant_id: str | None = None,
    action: str | None = None,
    limit: int = 100,
) -> list[AuditEntry]:
    """The newest entries first, filtered by tenant and action."""
    clauses, params = [], []
    if tenant_id is not None:
        clauses.append("tenant_id = ?")
        params.append(tenant_id)
    if action is not None:
        clauses.append("action = ?")
        params.append(action)
    where = " WHERE " + " AND ".join(clauses) if clauses else ""
    sql = f"{_SELECT_AUDIT}{where} ORDER BY id DESC LIMIT ?"
    return [_audit(values) for values in conn.execute(sql, (*params, limit))]


# -- decoding --------------------------------------------------------------------------------


def _tenant(values: tuple[Any, ...]) -> TenantRow:
    raw = dict(zip(_TENANT_COLUMNS, values, strict=True))
    return TenantRow(
        **{**raw, "admin": bool(raw["admin"]), "created_at": decode_time(raw["created_at"])}
    )


def _key(values: tuple[Any, ...]) -> KeyRow:
    raw = dict(zip(_KEY_COLUMNS, values, strict=True))
    for name in ("created_at", "last_used_at", "revoked_at"):
        raw[name] = decode_time(raw[name]) if raw[name] is not None else None
    return KeyRow(**raw)


def _audit(values: tuple[Any, ...]) -> AuditEntry:
    raw = dict(zip(_AUDIT_COLUMNS, values, strict=True))
    return AuditEntry(**{**raw, "at": decode_time(raw["at"]), "detail": json.loads(raw["detail"])})


__all__ = [
    "LOCAL_TENANT_ID",
    "QUOTA_NAMES",
    "AuditEntry",
    "KeyRow",
    "TenantRow",
    "Usage",
]
