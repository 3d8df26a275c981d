"""Snapshots on the wire: a sandbox's saved memory and disk, to fork new sandboxes from."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from emberbox.models.common import PublicModel


class SnapshotPublic(PublicModel):
    """A snapshot (memory and disk) of a sandbox; new sandboxes can be forked from it."""

    # Never its host path or VMM (emberbox.api.views.snapshot_public).
    id: str
    sandbox_id: str = Field(description="The sandbox it was taken of (may since have stopped).")
    image: str
    vcpus: int
    memory_mib: int
    size_bytes: int = Field(description="Disk space the snapshot's files take on the server.")
    created_at: datetime


class SnapshotList(PublicModel):
    snapshots: list[SnapshotPublic]
