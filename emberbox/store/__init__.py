"""SQLite persistence: sandboxes and the commands they ran, tenants, keys, the audit log."""

from __future__ import annotations

from emberbox.store.migrations import MIGRATIONS, SCHEMA_VERSION
from emberbox.store.records import (
    LOCAL_TENANT_ID,
    ExecLogEntry,
    SandboxFields,
    SandboxRow,
    SnapshotRow,
    utcnow,
)
from emberbox.store.store import Store

__all__ = [
    "LOCAL_TENANT_ID",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "ExecLogEntry",
    "SandboxFields",
    "SandboxRow",
    "SnapshotRow",
    "Store",
    "utcnow",
]
