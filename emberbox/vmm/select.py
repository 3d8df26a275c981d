"""Picking a driver from Settings: ``EMBERBOX_VMM=auto|firecracker|qemu``.

``auto`` takes Firecracker when its binary is present and KVM is usable, else QEMU
(with KVM when a probe boot proves it works, else TCG). Production mode refuses TCG,
and Firecracker without the jailer (it would run as root, in no cgroup): ``auto`` then
passes it over, ``firecracker`` fails.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from emberbox.config import Settings
from emberbox.errors import HostError
from emberbox.vmm import accel, cgroups, vmm_user
from emberbox.vmm.base import BootFiles, Driver
from emberbox.vmm.qemu.driver import HostLimits, QemuDriver

log = logging.getLogger("emberbox.vmm")
UNJAILED = (
    "production mode refuses Firecracker without the jailer (it would run as root in no "
    "cgroup): set EMBERBOX_FIRECRACKER_JAILER=true with EMBERBOX_JAILER_UID/GID"
)


@dataclass(frozen=True)
class DriverChoice:
    driver: Driver
    reason: str
    accel: str  # "kvm" or "tcg"


def firecracker_status(settings: Settings) -> tuple[bool, str]:
    from emberbox.vmm.firecracker.driver import firecracker_usable

    return firecracker_usable(settings.firecracker_binary)


def firecracker_driver(settings: Settings) -> Driver:
    from emberbox.vmm.firecracker.driver import SCRATCH_MIB, FirecrackerDriver
    from emberbox.vmm.firecracker.jailer import JailerConfig

    jailer = None
    if settings.firecracker_jailer:
        binary = shutil.which(settings.firecracker_binary)
        if binary is None or settings.jailer_uid is None or settings.jailer_gid is None:
            raise HostError(
                "jailer mode needs the firecracker binary on PATH and "
                "EMBERBOX_JAILER_UID / EMBERBOX_JAILER_GID set"
            )
        jailer = JailerConfig(
            exec_file=Path(binary),
            uid=settings.jailer_uid,
            gid=settings.jailer_gid,
            jailer_binary=settings.jailer_binary,
            chroot_base_dir=settings.jailer_chroot_base_dir,
            memory_overhead_mib=settings.jailer_memory_overhead_mib,
            cgroup_version=cgroups.version() or 2,
            fsize_limit_bytes=settings.jailer_fsize_limit_bytes,
        )
    return FirecrackerDriver(
        settings.firecracker_binary,
        jailer=jailer,
        api_timeout_s=settings.firecracker_api_timeout_s,
        scratch_mib=settings.max_disk_mib or SCRATCH_MIB,  # what a guest can write
    )


def choose_driver(settings: Settings, guest: BootFiles | None) -> DriverChoice:
    """The driver for this host and settings, and a sentence saying why."""
    if settings.vmm in ("auto", "firecracker"):
        usable, why = firecracker_status(settings)
        if usable and settings.mode == "production" and not settings.firecracker_jailer:
            usable, why = False, UNJAILED
        if usable:
            return DriverChoice(firecracker_driver(settings), f"firecracker: {why}", "kvm")
        if settings.vmm == "firecracker":
            raise HostError(f"EMBERBOX_VMM=firecracker but Firecracker is not usable: {why}")
        if why == UNJAILED:
            log.warning("Firecracker passed over: %s", why)
    limits = None
    if settings.vmm_cgroup_limits:
        limits = HostLimits(
            settings.vmm_memory_overhead_mib, settings.vmm_pids_max, settings.vmm_cpu_overhead
        )
    qemu = QemuDriver(
        "tcg",
        settings.qemu_binary,
        settings.qemu_img_binary,
        limits,
        user=vmm_user.resolve(settings.vmm_user),
        max_disk_mib=settings.max_disk_mib,
    )
    chosen, why = accel.resolve_accel(settings, qemu.version(), guest)
    if chosen == "tcg" and settings.mode == "production":
        raise HostError(
            f"production mode refuses QEMU TCG (software emulation is not a security "
            f"boundary); KVM is needed: {why}"
        )
    if chosen == "tcg":
        log.warning("QEMU with TCG software emulation (%s): slow, and NOT a security boundary", why)
    qemu.accel = chosen
    qemu.check_host()  # e.g. a VMM user that cannot open /dev/kvm: say so now
    return DriverChoice(qemu, f"qemu/{chosen}: {why}", chosen)


class DriverCache:
    """One driver per process and settings: the choice (and its KVM probe) is made once."""

    def __init__(self) -> None:
        self._choice: DriverChoice | None = None

    def get(self, settings: Settings, boot_files: Callable[[], BootFiles]) -> Driver:
        """The driver; ``boot_files`` (an image's kernel and disks, for the KVM probe) is
        called only the first time."""
        if self._choice is None:
            self._choice = choose_driver(settings, boot_files())
        return self._choice.driver
