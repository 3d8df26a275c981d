"""Typed rows in and out of the store, and their encoding (the same on SQLite and
PostgreSQL).

The store knows nothing of the sandbox state machine: ``state`` is plain text here and
the service layer (:mod:`emberbox.service.sandboxes.state`) decides which moves are legal.
Datetimes are always timezone-aware UTC; they are stored as ISO 8601 text with
microseconds so that SQL string comparison orders them correctly.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict

#: The built-in tenant: local mode, ``Settings.api_key`` and every row from before tenants.
LOCAL_TENANT_ID = "local"


def utcnow() -> datetime:
    """Now, timezone-aware UTC."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class SandboxRow:
    """One row of ``sandboxes``."""

    id: str
    state: str
    image: str
    vcpus: int
    memory_mib: int
    timeout_s: int
    created_at: datetime
    expires_at: datetime
    updated_at: datetime
    metadata: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    vmm_pid: int | None = None
    work_dir: Path | None = None
    ip_address: str | None = None
    error: str | None = None
    snapshot_id: str | None = None  # forked from this snapshot
    paused_dir: Path | None = None  # while paused: the saved VM
    tenant_id: str = LOCAL_TENANT_ID  # the owner
    host: str | None = None  # cluster: the host that runs it (None on a single host)


@dataclass(frozen=True)
class SnapshotRow:
    """One row of ``snapshots``."""

    id: str
    sandbox_id: str
    image: str
    vcpus: int
    memory_mib: int
    vmm: str
    vmm_version: str
    size_bytes: int
    created_at: datetime
    path: Path
    image_hash: str = ""  # the image build it was made from
    tenant_id: str = LOCAL_TENANT_ID  # the owner (the sandbox's)
    host: str | None = None  # cluster: the host that holds its files


@dataclass(frozen=True)
class ExecLogEntry:
    """One row of ``exec_log``: a command that ran (or tried to) in a sandbox."""

    sandbox_id: str
    command: list[str] | str
    started_at: datetime
    duration_ms: float
    exit_code: int | None = None
    timed_out: bool = False
    id: int | None = None  # assigned by SQLite


class SandboxFields(TypedDict, total=False):
    """The columns of ``sandboxes`` that may change after insert."""

    state: str
    timeout_s: int
    expires_at: datetime
    metadata: dict[str, str]
    env: dict[str, str]
    vmm_pid: int | None
    work_dir: Path | None
    ip_address: str | None
    error: str | None
    paused_dir: Path | None
    host: str | None


UPDATABLE_COLUMNS = frozenset(SandboxFields.__annotations__)
SANDBOX_COLUMNS = (
    "id",
    "state",
    "image",
    "vcpus",
    "memory_mib",
    "metadata",
    "env",
    "timeout_s",
    "created_at",
    "expires_at",
    "updated_at",
    "vmm_pid",
    "work_dir",
    "ip_address",
    "error",
    "snapshot_id",
    "paused_dir",
    "tenant_id",
    "host",
)
SNAPSHOT_COLUMNS = (
    "id",
    "sandbox_id",
    "image",
    "vcpus",
    "memory_mib",
    "vmm",
    "vmm_version",
    "size_bytes",
    "created_at",
    "path",
    "image_hash",
    "tenant_id",
    "host",
)


def encode_time(value: datetime) -> str:
    """UTC ISO 8601 with microseconds; naive datetimes are refused (they are bugs)."""
    if value.tzinfo is None:
        raise ValueError(f"naive datetime {value!r}: the store only takes aware datetimes")
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def decode_time(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def encode_value(value: Any) -> Any:
    """A Python value as the store keeps it (JSON for mappings, text for paths and times)."""
    if isinstance(value, datetime):
        return encode_time(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return value


def row_to_params(row: SandboxRow) -> tuple[Any, ...]:
    return tuple(encode_value(getattr(row, name)) for name in SANDBOX_COLUMNS)


def sandbox_from_db(values: tuple[Any, ...]) -> SandboxRow:
    """Decode a ``SELECT <SANDBOX_COLUMNS>`` tuple."""
    raw = dict(zip(SANDBOX_COLUMNS, values, strict=True))
    return SandboxRow(
        id=raw["id"],
        state=raw["state"],
        image=raw["image"],
        vcpus=raw["vcpus"],
        memory_mib=raw["memory_mib"],
        metadata=json.loads(raw["metadata"]),
        env=json.loads(raw["env"]),
        timeout_s=raw["timeout_s"],
        created_at=decode_time(raw["created_at"]),
        expires_at=decode_time(raw["expires_at"]),
        updated_at=decode_time(raw["updated_at"]),
        vmm_pid=raw["vmm_pid"],
        work_dir=Path(raw["work_dir"]) if raw["work_dir"] is not None else None,
        ip_address=raw["ip_address"],
        error=raw["error"],
        snapshot_id=raw["snapshot_id"],
        paused_dir=Path(raw["paused_dir"]) if raw["paused_dir"] is not None else None,
        tenant_id=raw["tenant_id"],
        host=raw["host"],
    )


def snapshot_to_params(row: SnapshotRow) -> tuple[Any, ...]:
    return tuple(encode_value(getattr(row, name)) for name in SNAPSHOT_COLUMNS)


def snapshot_from_db(values: tuple[Any, ...]) -> SnapshotRow:
    """Decode a ``SELECT <SNAPSHOT_COLUMNS>`` tuple."""
    raw = dict(zip(SNAPSHOT_COLUMNS, values, strict=True))
    return SnapshotRow(
        **{**raw, "created_at": decode_time(raw["created_at"]), "path": Path(raw["path"])}
    )


def exec_from_db(values: tuple[Any, ...]) -> ExecLogEntry:
    """Decode a ``SELECT id, sandbox_id, command, exit_code, duration_ms, timed_out,
    started_at`` tuple."""
    id_, sandbox_id, command, exit_code, duration_ms, timed_out, started_at = values
    return ExecLogEntry(
        id=id_,
        sandbox_id=sandbox_id,
        command=json.loads(command),
        exit_code=exit_code,
        duration_ms=duration_ms,
        timed_out=bool(timed_out),
        started_at=decode_time(started_at),
    )
