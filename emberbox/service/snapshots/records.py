"""Snapshots as the service reports them (the rows live in ``snapshots``, SQLite)."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

from emberbox import errors
from emberbox.store import SnapshotRow
from emberbox.vmm.base import SnapshotFiles

log = logging.getLogger(__name__)


#: A saved sandbox (memory + disk) from which new sandboxes can be forked, as the service
#: reports it: the store's row itself (UTC times; ``path`` is a host directory, never sent
#: over the wire). ``sandbox_id`` is the sandbox it was taken from; a fork gets its image,
#: vcpus and memory_mib.
SnapshotRecord = SnapshotRow


@contextlib.contextmanager
def public_snapshot_errors(what: str) -> Iterator[None]:
    """SnapshotCorrupt names host paths: log those, tell the caller only the file's name."""
    try:
        yield
    except errors.SnapshotCorrupt as exc:
        log.warning("%s cannot be loaded: %s", what, exc.message)
        name = Path(str(exc.details.get("file", "?"))).name
        raise errors.SnapshotCorrupt(
            f"{what} cannot be loaded: its file {name!r} is missing, truncated or corrupt",
            file=name,
        ) from exc


def fork_shape(
    source: SnapshotRow, image: str | None, vcpus: int | None, memory_mib: int | None
) -> tuple[str, int, int]:
    """A fork has its snapshot's image and shape; asking for others is a 409."""
    wanted = {"image": image, "vcpus": vcpus, "memory_mib": memory_mib}
    have = {"image": source.image, "vcpus": source.vcpus, "memory_mib": source.memory_mib}
    for name, value in wanted.items():
        if value is not None and value != have[name]:
            raise errors.SnapshotMismatch(
                f"snapshot {source.id} was made of a sandbox with {name}={have[name]!r}; "
                f"a fork of it cannot have {name}={value!r} (leave it out)",
                snapshot_id=source.id,
                field=name,
            )
    return source.image, source.vcpus, source.memory_mib


def snapshot_files(row: SnapshotRow) -> SnapshotFiles:
    return SnapshotFiles(directory=row.path, vmm=row.vmm, vmm_version=row.vmm_version)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def disk_usage(path: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


_META = "meta.json"


def write_meta(directory: Path, files: SnapshotFiles) -> None:
    meta = {"vmm": files.vmm, "vmm_version": files.vmm_version}
    (directory / _META).write_text(json.dumps(meta))


def read_meta(directory: Path) -> SnapshotFiles:
    path = directory / _META
    try:
        meta = json.loads(path.read_text())
        return SnapshotFiles(directory, str(meta["vmm"]), str(meta["vmm_version"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise errors.SnapshotCorrupt(f"cannot read {path}: {exc}", file=str(path)) from exc
