"""Store rows as a test wants them: defaults for every field, overrides by name."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from emberbox.store import SandboxRow


def make_row(sandbox_id: str = "sb1", **overrides: object) -> SandboxRow:
    now = datetime(2020, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    values: dict[str, object] = {
        "id": sandbox_id,
        "state": "creating",
        "image": "default",
        "vcpus": 1,
        "memory_mib": 512,
        "timeout_s": 300,
        "created_at": now,
        "expires_at": now + timedelta(seconds=300),
        "updated_at": now,
        "metadata": {"team": "a"},
        "env": {"K": "V"},
        "work_dir": Path("/vms") / sandbox_id,
    }
    values.update(overrides)
    return SandboxRow(**values)  # type: ignore[arg-type]
