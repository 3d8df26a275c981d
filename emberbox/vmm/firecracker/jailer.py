"""Running Firecracker under its jailer: chroot, own uid/gid, cgroup v2 limits, pid namespace.

The jailer (shipped with each Firecracker release) must run as root. It builds
``<chroot_base>/<exec name>/<id>/root``, copies the Firecracker binary in, puts the
process in a cgroup, pivots into the chroot, drops to ``uid:gid`` and execs Firecracker.
With ``--new-pid-ns`` the jailer itself exits at once and writes Firecracker's pid to
``<root>/<exec name>.pid``.

Firecracker then sees only the jail, so every file it uses (kernel, initrd, disk, logs)
must be put in the jail root before it starts, and named by paths relative to that root.
:func:`jailer_command` is pure; the other helpers place and remove files.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from emberbox.errors import InvalidRequest

JAIL_API_SOCKET = "/run/firecracker.socket"  # inside the jail
_JAIL_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")  # what the jailer accepts for --id


@dataclass(frozen=True)
class JailerConfig:
    """How every VM of this host is jailed (per-VM values come from the VMConfig)."""

    exec_file: Path  # absolute path of the firecracker binary; its name must contain it
    uid: int
    gid: int
    jailer_binary: str = "jailer"
    chroot_base_dir: Path = Path("/srv/jailer")
    parent_cgroup: str | None = None  # default: the jailer uses the exec file's name
    cgroup_root: Path = Path("/sys/fs/cgroup")
    cgroup_version: int = 2  # the host's: v1 hosts get per-controller limits (see below)
    memory_overhead_mib: int = 64  # VMM's own memory on top of the guest's, in memory.max
    cpu_period_us: int = 100_000
    fsize_limit_bytes: int | None = None  # RLIMIT_FSIZE; must exceed disk + memory snapshot
    new_pid_ns: bool = True

    @property
    def exec_name(self) -> str:
        return self.exec_file.name


def check_jail_id(vm_id: str) -> str:
    """The VM id as a jailer ``--id``; raises InvalidRequest if the jailer would refuse it."""
    if not _JAIL_ID.match(vm_id):
        raise InvalidRequest(
            f"VM id {vm_id!r} cannot be a jailer id (1-64 letters, digits or hyphens)"
        )
    return vm_id


def jail_dir(cfg: JailerConfig, vm_id: str) -> Path:
    """``<chroot_base>/<exec name>/<id>``: everything the jailer made for this VM."""
    return cfg.chroot_base_dir / cfg.exec_name / check_jail_id(vm_id)


def jail_root(cfg: JailerConfig, vm_id: str) -> Path:
    """The directory Firecracker sees as ``/`` (and works in)."""
    return jail_dir(cfg, vm_id) / "root"


def api_socket_path(cfg: JailerConfig, vm_id: str) -> Path:
    """The host path of the API socket a jailed Firecracker creates."""
    return jail_root(cfg, vm_id) / JAIL_API_SOCKET.lstrip("/")


def pid_file(cfg: JailerConfig, vm_id: str) -> Path:
    """Where the jailer writes Firecracker's pid when it spawns it in a new pid namespace."""
    return jail_root(cfg, vm_id) / f"{cfg.exec_name}.pid"


def cgroup_dir(cfg: JailerConfig, vm_id: str) -> Path:
    return cgroup_dirs(cfg, vm_id)[0]


def cgroup_dirs(cfg: JailerConfig, vm_id: str) -> list[Path]:
    """The VM's cgroup directories: one under v2, one per limited controller under v1."""
    name = Path(cfg.parent_cgroup or cfg.exec_name) / check_jail_id(vm_id)
    if cfg.cgroup_version == 1:
        return [cfg.cgroup_root / controller / name for controller in V1_CONTROLLERS]
    return [cfg.cgroup_root / name]


V1_CONTROLLERS = ("memory", "cpu")


def cgroup_limits(cfg: JailerConfig, vcpus: int, memory_max: int) -> list[str]:
    """The jailer's ``--cgroup`` values: memory and CPU caps in the host's cgroup version."""
    period = cfg.cpu_period_us
    if cfg.cgroup_version == 1:
        return [
            f"memory.limit_in_bytes={memory_max}",
            f"cpu.cfs_period_us={period}",
            f"cpu.cfs_quota_us={vcpus * period}",
        ]
    return [f"memory.max={memory_max}", f"cpu.max={cpu_max(vcpus, period)}"]


def cpu_max(vcpus: int, period_us: int) -> str:
    """cgroup v2 ``cpu.max``: at most ``vcpus`` full CPUs per period."""
    return f"{vcpus * period_us} {period_us}"


def jailer_command(
    cfg: JailerConfig, vm_id: str, vcpus: int, memory_mib: int, netns: Path | None = None
) -> list[str]:
    """The jailer's argv for one VM, Firecracker's own arguments after ``--``."""
    if not cfg.exec_file.is_absolute():
        raise InvalidRequest(f"jailer exec file must be an absolute path, not {cfg.exec_file}")
    if "firecracker" not in cfg.exec_name:
        raise InvalidRequest(f"jailer exec file name must contain 'firecracker': {cfg.exec_name}")
    memory_max = (memory_mib + cfg.memory_overhead_mib) << 20
    argv = [
        cfg.jailer_binary,
        "--id", check_jail_id(vm_id),
        "--exec-file", str(cfg.exec_file),
        "--uid", str(cfg.uid),
        "--gid", str(cfg.gid),
        "--chroot-base-dir", str(cfg.chroot_base_dir),
        "--cgroup-version", str(cfg.cgroup_version),
    ]  # fmt: skip
    for limit in cgroup_limits(cfg, vcpus, memory_max):
        argv += ["--cgroup", limit]
    if cfg.parent_cgroup is not None:
        argv += ["--parent-cgroup", cfg.parent_cgroup]
    if cfg.fsize_limit_bytes is not None:
        argv += ["--resource-limit", f"fsize={cfg.fsize_limit_bytes}"]
    if cfg.new_pid_ns:
        argv.append("--new-pid-ns")
    if netns is not None:
        argv += ["--netns", str(netns)]
    return [*argv, "--", "--api-sock", JAIL_API_SOCKET]


def link_or_copy(src: Path, dest: Path) -> None:
    """Hard-link ``src`` to ``dest`` (instant, no space); copy when not on one filesystem.

    Only for files Firecracker reads and every jailed uid may read (kernel, initrd):
    a hard link shares the inode, so it shares the owner and mode too.
    """
    with contextlib.suppress(FileNotFoundError):
        dest.unlink()
    try:
        os.link(src, dest)
    except OSError:  # EXDEV (other filesystem), EPERM (protected_hardlinks)
        shutil.copyfile(src, dest)


def make_jail_root(cfg: JailerConfig, vm_id: str) -> Path:
    """Create the jail root (and its ``run/`` for the API socket) owned by the VM's uid."""
    root = jail_root(cfg, vm_id)
    root.mkdir(parents=True, exist_ok=True)
    (root / "run").mkdir(exist_ok=True)
    give_to_jail(cfg, root / "run")
    return root


def give_to_jail(cfg: JailerConfig, path: Path) -> None:
    """Let the jailed uid read and write ``path`` (files we create for it as root)."""
    os.chown(path, cfg.uid, cfg.gid)


def remove_jail(cfg: JailerConfig, vm_id: str) -> None:
    """Remove the jail and its cgroup; idempotent, best effort (cgroup busy until exit)."""
    shutil.rmtree(jail_dir(cfg, vm_id), ignore_errors=True)
    for directory in cgroup_dirs(cfg, vm_id):
        with contextlib.suppress(OSError):
            directory.rmdir()
