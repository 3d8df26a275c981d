"""Persistence: sandboxes and the commands they ran, tenants, keys, the audit log and
(cluster) hosts; SQLite on a single host, PostgreSQL for a cluster's API replicas."""

from __future__ import annotations

from emberbox.store.database import database_target, open_database
from emberbox.store.hosts import LOST_STATE, HostRow
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
    "LOST_STATE",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "ExecLogEntry",
    "HostRow",
    "SandboxFields",
    "SandboxRow",
    "SnapshotRow",
    "Store",
    "database_target",
    "open_database",
    "utcnow",
]
