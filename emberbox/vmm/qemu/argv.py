"""QEMU command lines, built by pure functions (typed config in, ``list[str]`` out).

QEMU opens no host path of ours: the host binds the sockets and opens the kernel,
initrd, every disk layer and the RAM file, and QEMU gets them as inherited descriptors
(:class:`HostFds`): sockets as ``fd=N`` listening chardevs, disks through ``-add-fd`` fd
sets with the backing chain spelled out as ``-blockdev`` nodes (so QEMU never follows a
backing file name), and kernel, initrd and RAM file as ``/proc/self/fd/N``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from emberbox.guest.protocol import AGENT_PORT_NAME
from emberbox.vmm.base import VMConfig

Accel = Literal["kvm", "tcg"]
# The machine's device set: bump it whenever an argv change alters the devices (and so
# the saved state). Snapshots and templates record it with QEMU's version
# (QemuDriver.state_version), so one made for another device set is refused
# (SnapshotMismatch) or rebuilt, never loaded into the wrong machine.
# 2: q35 without SATA and SMBus.
MACHINE_REVISION = "2"
# The option ROM QEMU adds for -kernel on q35 (fw_cfg DMA), from its own data directory.
LINUXBOOT_ROM = "linuxboot_dma.bin"
SECCOMP = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
# Skip hardware the guest would otherwise probe for (slow under emulation).
BASE_KERNEL_ARGS = (
    "console=ttyS0",
    "panic=-1",
    "quiet",
    "i8042.noaux",
    "i8042.nomux",
    "i8042.nopnp",
    "i8042.dumbkbd",
    "8250.nr_uarts=1",
)
# Under TCG only: no address-space randomisation in the guest's user space. QEMU 7.2
# looks translated code up by guest virtual address, so with ASLR every new process
# (its ld.so, libc and binary at fresh addresses) is translated again: measured in a
# guest, /bin/true 21 -> 6 ms, `bash -l -c true` 81 -> 16-21 ms, `python3 -c pass`
# 120 -> 82 ms. TCG is development only (production refuses it) and not a security
# boundary; under KVM, which translates nothing, guests keep ASLR.
TCG_KERNEL_ARGS = ("norandmaps",)


@dataclass(frozen=True)
class QemuPaths:
    """Where a VM's sockets and files live inside its work dir (0700, root's)."""

    work_dir: Path

    @property
    def qmp(self) -> Path:
        return self.work_dir / "qmp.sock"

    @property
    def agent(self) -> Path:
        return self.work_dir / "agent.sock"

    @property
    def console(self) -> Path:
        return self.work_dir / "console.sock"

    @property
    def console_log(self) -> Path:
        return self.work_dir / "console.log"

    @property
    def vmm_log(self) -> Path:
        return self.work_dir / "qemu.log"

    @property
    def overlay(self) -> Path:
        return self.work_dir / "overlay.qcow2"


@dataclass(frozen=True)
class DiskLayer:
    fd: int
    format: str  # "qcow2" or "raw"
    label: str  # shown in QEMU's argv and `query-fdsets`


@dataclass(frozen=True)
class HostFds:
    """Descriptor numbers the host opened for one QEMU (the same in QEMU: pass_fds)."""

    qmp: int  # listening unix sockets
    agent: int
    console: int
    kernel: int
    initrd: int
    disk: tuple[DiskLayer, ...]  # the writable overlay first, then its backing chain
    memory: int | None = None  # the RAM file, when config.memory_file is set


def machine_args(accel: Accel) -> list[str]:
    """The ``-machine`` value followed by the ``-cpu`` option for ``accel``."""
    if accel == "kvm":
        machine = "microvm,accel=kvm,acpi=on,x-option-roms=off,pit=off,pic=off,rtc=on"
        return [machine, "-cpu", "host"]
    # No AHCI (SATA) or SMBus controller: nothing uses them, and QEMU starts ~12 ms faster.
    return ["q35,accel=tcg,sata=off,smbus=off", "-cpu", "max"]


def device_args(accel: Accel) -> tuple[str, str]:
    """(block device, serial bus) model names for the machine type."""
    if accel == "kvm":
        return "virtio-blk-device", "virtio-serial-device"
    return "virtio-blk-pci", "virtio-serial-pci"


def network_args(config: VMConfig, accel: Accel) -> list[str]:
    """Every VM has one virtio NIC, so that a snapshot of any VM restores into any other
    (same device set): on the TAP ``config.tap_fd`` (a networked sandbox; the host
    opened it in the sandbox's namespace), else on a hub port with no other port (a
    cable to nowhere). The TAP has no vnet header, so both offer the guest the same features."""
    nic = "virtio-net-device" if accel == "kvm" else "virtio-net-pci"
    if config.tap_fd is None:
        backend = "hubport,id=net0,hubid=0"
    else:
        backend = f"tap,id=net0,fd={config.tap_fd}"
    return ["-netdev", backend, "-device", f"{nic},netdev=net0,mac=52:54:00:eb:00:01"]


def boot_args(accel: Accel, config: VMConfig, fds: HostFds, *, incoming: bool) -> list[str]:
    """How the guest starts: ``-kernel``/``-initrd``/``-append`` for a boot.

    A restore under TCG (q35) gets none of them: the guest is already booted, and QEMU
    would keep the whole kernel image in its heap for fw_cfg (14 MiB of every idle
    clone, for a reboot that ``-no-reboot`` never lets happen). Only the option ROM that
    ``-kernel`` adds is named instead, because it is a RAM block of the saved state (its
    name, ``/rom@genroms/linuxboot_dma.bin``, must be there for the state to load).
    microvm (KVM) adds no such ROM and keeps its usual arguments.
    """
    if incoming and accel == "tcg":
        return ["-option-rom", LINUXBOOT_ROM]
    return [
        "-kernel", fd_path(fds.kernel),
        "-initrd", fd_path(fds.initrd),
        "-append", kernel_cmdline(accel, config.kernel_args),
    ]  # fmt: skip


def kernel_cmdline(accel: Accel, extra: tuple[str, ...] = ()) -> str:
    tcg = TCG_KERNEL_ARGS if accel == "tcg" else ()
    return " ".join((*BASE_KERNEL_ARGS, *tcg, *extra))


def escape(value: str) -> str:
    """A value inside a QEMU ``key=value,...`` option (a comma is written twice)."""
    return value.replace(",", ",,")


def fd_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def memory_args(config: VMConfig, memory_fd: int | None, *, shared: bool) -> list[str]:
    """Guest RAM as a backend named ``mem`` in every case, so that a snapshot of any VM
    can be loaded by any other with the same shape (RAM blocks are matched by name)."""
    size = f"size={config.memory_mib}M"
    if config.memory_file is None or memory_fd is None:
        backend = f"memory-backend-ram,id=mem,{size}"
    else:
        share = "on" if shared else "off"
        backend = f"memory-backend-file,id=mem,{size},mem-path={fd_path(memory_fd)},share={share}"
    return ["-object", backend]


def disk_args(layers: tuple[DiskLayer, ...]) -> list[str]:
    """One fd set and a file + format node per layer; the top node is ``root``.

    Every ``backing`` is given explicitly, so QEMU never opens the name in a header.
    The layers below the top are read-only (their fds are too).
    """
    args: list[str] = []
    for index in reversed(range(len(layers))):
        layer, top = layers[index], index == 0
        node = "root" if top else f"layer{index}"
        mode = "cache.no-flush=on" if top else "read-only=on"
        fdset = index + 1
        backing = f",backing=layer{index + 1}" if index + 1 < len(layers) else ""
        args += [
            "-add-fd", f"fd={layer.fd},set={fdset},opaque={escape(layer.label)}",
            "-blockdev", f"driver=file,node-name={node}-file,filename=/dev/fdset/{fdset},{mode}",
            "-blockdev", f"driver={layer.format},node-name={node},file={node}-file{backing},{mode}",
        ]  # fmt: skip
    return args


def build_argv(
    binary: str,
    accel: Accel,
    config: VMConfig,
    fds: HostFds,
    *,
    incoming: bool = False,
    shared: bool = True,
) -> list[str]:
    """The QEMU command line for ``config`` (pure: no files touched).

    ``fds``: what the host opened for this QEMU. ``incoming``: wait for a saved state
    (``-incoming defer``) instead of booting. ``shared``: map ``config.memory_file``
    shared (a template) or copy-on-write (a clone).
    """
    blk, serial_bus = device_args(accel)
    machine, *cpu = machine_args(accel)
    return [
        binary,
        "-name", f"emberbox-{config.vm_id},process=emberbox-{config.vm_id}",
        *memory_args(config, fds.memory, shared=shared),
        "-machine", f"{machine},memory-backend=mem",
        *cpu,
        "-smp", str(config.vcpus),
        "-m", f"{config.memory_mib}M",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        *boot_args(accel, config, fds, incoming=incoming),
        "-chardev", f"socket,id=console,fd={fds.console},server=on,wait=off",
        "-serial", "chardev:console",
        *disk_args(fds.disk),
        # A host disk that fills up is an I/O error for the guest, not a paused VM.
        "-device", f"{blk},drive=root,werror=report,rerror=report",
        "-device", f"{serial_bus},id=vser",
        "-chardev", f"socket,id=agent,fd={fds.agent},server=on,wait=off",
        "-device", f"virtserialport,bus=vser.0,chardev=agent,name={AGENT_PORT_NAME}",
        *network_args(config, accel),
        "-chardev", f"socket,id=qmp,fd={fds.qmp},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        # seccomp: no obsolete syscalls, no setuid/exec of helpers, no affinity games.
        "-sandbox", SECCOMP,
        *(["-incoming", "defer"] if incoming else []),
    ]  # fmt: skip


def overlay_argv(
    qemu_img: str, backing: Path, overlay: Path, backing_format: str = "raw"
) -> list[str]:
    return [
        *(qemu_img, "create", "-q", "-f", "qcow2"),
        *("-F", backing_format, "-b", str(backing), str(overlay)),
    ]
