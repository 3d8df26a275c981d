"""SQLite persistence: sandboxes and the commands they ran."""

from __future__ import annotations

from emberbox.store.db import Store
from emberbox.store.migrations import MIGRATIONS, SCHEMA_VERSION
from emberbox.store.records import ExecLogEntry, SandboxFields, SandboxRow, SnapshotRow, utcnow

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "ExecLogEntry",
    "SandboxFields",
    "SandboxRow",
    "SnapshotRow",
    "Store",
    "utcnow",
]
