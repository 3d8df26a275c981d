"""Snapshots as the service reports them (the rows live in ``snapshots``, SQLite)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path


@dataclass(frozen=True)
class SnapshotRecord:
    """A saved sandbox (memory + disk) from which new sandboxes can be forked. UTC times.

    ``sandbox_id`` is the sandbox it was taken from (which may since have stopped);
    image, vcpus and memory_mib are that sandbox's, and a fork gets the same.
    """

    id: str
    sandbox_id: str
    image: str
    vcpus: int
    memory_mib: int
    vmm: str
    vmm_version: str
    size_bytes: int
    created_at: datetime
    path: Path  # host directory; never sent over the wire
    image_hash: str = ""  # the image build it was made from
