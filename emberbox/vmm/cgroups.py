"""Host-side limits for one VMM process: a cgroup with ``memory``, ``pids`` and CPU limits.

cgroup v2 (modern hosts): ``/sys/fs/cgroup/emberbox/<vm id>`` with ``memory.max``,
``memory.swap.max``, ``pids.max`` and ``cpu.max``. cgroup v1 (these build machines): the
same group name under the ``memory``, ``pids`` and ``cpu`` (or ``cpu,cpuacct``)
hierarchies, with ``memory.limit_in_bytes``, ``pids.max`` and ``cpu.cfs_quota_us`` /
``cpu.cfs_period_us``. Where neither can be written (not root, no controllers) the VM
runs without and :func:`create` says why once.

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
V1_CPU = ("cpu", "cpu,cpuacct")  # the hierarchy's mount name differs between hosts


@dataclass(frozen=True)
class CpuQuota:
    """At most ``quota_us`` of CPU time per ``period_us`` (quota/period CPUs)."""

    quota_us: int
    period_us: int = 100_000


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


def create(
    name: str,
    memory_bytes: int,
    pids_max: int,
    root: Path = ROOT,
    *,
    cpu: CpuQuota | None = None,
) -> HostCgroup | None:
    """A fresh group for VM ``name`` with the limits set, or None (logged once) where
    this host does not let us make one."""
    found = version(root)
    try:
        if found == 2:
            return _create_v2(root, name, memory_bytes, pids_max, cpu)
        if found == 1:
            return _create_v1(root, name, memory_bytes, pids_max, cpu)
        reason = f"no cgroup filesystem at {root}"
    except OSError as exc:
        reason = f"cannot create a cgroup under {root}: {exc}"
    _warn_once(f"VMM processes run without host-side limits: {reason}")
    return None


def _create_v2(
    root: Path, name: str, memory_bytes: int, pids_max: int, cpu: CpuQuota | None
) -> HostCgroup:
    parent = root / GROUP
    parent.mkdir(exist_ok=True)
    for level in (root, parent):  # controllers must be enabled on the way down
        control = level / "cgroup.subtree_control"
        try:
            control.write_text("+memory +pids +cpu")
        except OSError:  # no cpu controller here: at least memory and pids
            with contextlib.suppress(OSError):
                control.write_text("+memory +pids")
    group = parent / name
    group.mkdir(exist_ok=True)
    try:
        (group / "memory.max").write_text(str(memory_bytes))
        with contextlib.suppress(FileNotFoundError):  # no swap accounting on this kernel
            (group / "memory.swap.max").write_text("0")
        (group / "pids.max").write_text(str(pids_max))
        if cpu is not None:
            (group / "cpu.max").write_text(f"{cpu.quota_us} {cpu.period_us}")
    except OSError:
        with contextlib.suppress(OSError):
            group.rmdir()
        raise
    return HostCgroup((group,), 2)


def _v1_cpu_root(root: Path) -> Path | None:
    for mount in V1_CPU:
        if (root / mount / "cpu.cfs_quota_us").exists():
            return root / mount
    return None


def _create_v1(
    root: Path, name: str, memory_bytes: int, pids_max: int, cpu: CpuQuota | None
) -> HostCgroup:
    memory = root / "memory" / GROUP / name
    pids = root / "pids" / GROUP / name
    cpu_root = _v1_cpu_root(root) if cpu is not None else None
    groups = [memory, pids] + ([cpu_root / GROUP / name] if cpu_root is not None else [])
    if cpu is not None and cpu_root is None:
        _warn_once(f"no cpu cgroup hierarchy under {root}: VMM CPU use is not limited")
    made: list[Path] = []
    try:
        for group in groups:
            group.mkdir(parents=True, exist_ok=True)
            made.append(group)
        (memory / "memory.limit_in_bytes").write_text(str(memory_bytes))
        (pids / "pids.max").write_text(str(pids_max))
        if cpu is not None and cpu_root is not None:
            # The period first: a quota is checked against the period in force.
            (groups[2] / "cpu.cfs_period_us").write_text(str(cpu.period_us))
            (groups[2] / "cpu.cfs_quota_us").write_text(str(cpu.quota_us))
    except OSError:
        for group in made:
            with contextlib.suppress(OSError):
                group.rmdir()
        raise
    return HostCgroup(tuple(groups), 1)


def existing(name: str, root: Path = ROOT) -> HostCgroup | None:
    """The groups of VM ``name`` made by an earlier process (to remove them later)."""
    v2 = root / GROUP / name
    if v2.is_dir() and (root / "cgroup.controllers").exists():
        return HostCgroup((v2,), 2)
    candidates = [root / "memory" / GROUP / name, root / "pids" / GROUP / name]
    candidates += [root / mount / GROUP / name for mount in V1_CPU]
    found: dict[Path, Path] = {}  # "cpu" is often a symlink to "cpu,cpuacct": once each
    for path in candidates:
        if path.is_dir():
            found.setdefault(path.resolve(), path)
    return HostCgroup(tuple(found.values()), 1) if found else None


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        log.warning("%s", reason)


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
