"""Host-side limits for one VMM process: a cgroup with ``memory`` and ``pids`` limits.

cgroup v2 (modern hosts): ``/sys/fs/cgroup/emberbox/<vm id>`` with ``memory.max``,
``memory.swap.max`` and ``pids.max``. cgroup v1 (these build machines): the same group
name under the ``memory`` and ``pids`` hierarchies, with ``memory.limit_in_bytes`` and
``pids.max``. Where neither can be written (not root, no controllers) the VM runs without
and :func:`create` says why once.

The guest's RAM is limited by the VM itself; this bounds what a misbehaving VMM (or a
guest exploiting it) can take from the host beyond that.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path("/sys/fs/cgroup")
GROUP = "emberbox"
_warned: set[str] = set()


@dataclass(frozen=True)
class HostCgroup:
    """The group directories of one VM (one for v2; one per controller for v1)."""

    dirs: tuple[Path, ...]
    version: int

    def add(self, pid: int) -> None:
        for directory in self.dirs:
            (directory / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        """Remove the (empty) groups; call once the process has ended."""
        for directory in self.dirs:
            with contextlib.suppress(FileNotFoundError):
                _rmdir_when_empty(directory)


def version(root: Path = ROOT) -> int | None:
    if (root / "cgroup.controllers").exists():
        return 2
    if (root / "memory" / "memory.limit_in_bytes").exists():
        return 1
    return None


def create(name: str, memory_bytes: int, pids_max: int, root: Path = ROOT) -> HostCgroup | None:
    """A fresh group for VM ``name`` with the limits set, or None (logged once) where
    this host does not let us make one."""
    found = version(root)
    try:
        if found == 2:
            return _create_v2(root, name, memory_bytes, pids_max)
        if found == 1:
            return _create_v1(root, name, memory_bytes, pids_max)
        reason = f"no cgroup filesystem at {root}"
    except OSError as exc:
        reason = f"cannot create a cgroup under {root}: {exc}"
    if reason not in _warned:
        _warned.add(reason)
        log.warning("VMM processes run without host-side limits: %s", reason)
    return None


def _create_v2(root: Path, name: str, memory_bytes: int, pids_max: int) -> HostCgroup:
    parent = root / GROUP
    parent.mkdir(exist_ok=True)
    for level in (root, parent):  # controllers must be enabled on the way down
        with contextlib.suppress(OSError):
            (level / "cgroup.subtree_control").write_text("+memory +pids")
    group = parent / name
    group.mkdir(exist_ok=True)
    (group / "memory.max").write_text(str(memory_bytes))
    with contextlib.suppress(FileNotFoundError):  # no swap accounting on this kernel
        (group / "memory.swap.max").write_text("0")
    (group / "pids.max").write_text(str(pids_max))
    return HostCgroup((group,), 2)


def _create_v1(root: Path, name: str, memory_bytes: int, pids_max: int) -> HostCgroup:
    memory = root / "memory" / GROUP / name
    pids = root / "pids" / GROUP / name
    made: list[Path] = []
    try:
        for group in (memory, pids):
            group.mkdir(parents=True, exist_ok=True)
            made.append(group)
        (memory / "memory.limit_in_bytes").write_text(str(memory_bytes))
        (pids / "pids.max").write_text(str(pids_max))
    except OSError:
        for group in made:
            with contextlib.suppress(OSError):
                group.rmdir()
        raise
    return HostCgroup((memory, pids), 1)


def existing(name: str, root: Path = ROOT) -> HostCgroup | None:
    """The groups of VM ``name`` made by an earlier process (to remove them later)."""
    candidates = [root / GROUP / name, root / "memory" / GROUP / name, root / "pids" / GROUP / name]
    dirs = tuple(path for path in candidates if path.is_dir())
    return HostCgroup(dirs, 2 if dirs and dirs[0] == candidates[0] else 1) if dirs else None


def _rmdir_when_empty(directory: Path) -> None:
    """rmdir, retrying briefly: the kernel empties a group just after its last exit."""
    for _ in range(100):
        try:
            directory.rmdir()
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
        time.sleep(0.01)
    log.warning("cgroup %s is still busy; left in place", directory)
