"""The driver interface every virtual machine monitor implements.

A driver turns a :class:`VMConfig` into a running :class:`VM` and gives back a byte
stream to the guest agent. It knows nothing of HTTP, users or SQLite. Readiness (the
agent's handshake) and the boot watchdog live in :mod:`emberbox.service.vm.boot`, shared by
all drivers; drivers only start, connect, pause, snapshot and kill.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

AgentStream = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Lifetime = Literal["ephemeral", "detached"]


# What the image's init prints when the kernel command line asks for the KVM probe
# (``emberbox.probe``, see vmm/accel.py): the image and the VMM layer agree on it here.
PROBE_MARKER = "EMBERBOX-PROBE-OK"


@dataclass(frozen=True)
class BootFiles:
    """The host files a guest boots from (all read-only for the VMM)."""

    kernel: Path  # bzImage (QEMU)
    vmlinux: Path  # uncompressed ELF (Firecracker)
    initrd: Path
    rootfs: Path  # raw ext4, never written: every VM writes to its own overlay


@dataclass(frozen=True)
class VMConfig:
    """What to boot. Built by the service, consumed by a driver; pure data."""

    vm_id: str
    work_dir: Path  # private to this VM (0700); the driver puts sockets, overlay, logs here
    guest: BootFiles
    vcpus: int = 1
    memory_mib: int = 512
    kernel_args: tuple[str, ...] = ()
    console_log_max_bytes: int = 1 << 20
    # "ephemeral": the VM dies with the process that booted it (library use, CLI run).
    # "detached": the VM outlives its parent so that a restarted server can re-attach.
    lifetime: Lifetime = "ephemeral"
    # Back guest RAM with this file, shared, so that a snapshot of the VM can leave the RAM
    # in the file instead of copying it: that VM becomes a template whose clones map the
    # file copy-on-write. Drivers that cannot do this copy the RAM as usual.
    memory_file: Path | None = None
    # Where the disk's layers may live (the data dir, the image and template caches):
    # a recorded layer outside them is refused. Empty: not checked (library use, tests).
    disk_roots: tuple[Path, ...] = ()
    # An open TAP device (in the sandbox's network namespace) for the guest's NIC,
    # inherited by the VMM; None: the NIC is there but leads nowhere (no network).
    tap_fd: int | None = None
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SnapshotFiles:
    """A saved VM: device state + memory + the disk as it was, in one directory.

    The directory's layout is the writing driver's business; a restore checks ``vmm``
    and ``vmm_version`` against itself before it reads anything.
    """

    directory: Path
    vmm: str  # driver name that wrote it
    vmm_version: str
    # Set for a template: guest RAM stays in this file (see VMConfig.memory_file).
    memory_file: Path | None = None


@runtime_checkable
class VM(Protocol):
    """A running virtual machine owned by whoever holds this handle."""

    @property
    def vm_id(self) -> str: ...

    @property
    def pid(self) -> int | None: ...

    @property
    def work_dir(self) -> Path: ...

    def is_running(self) -> bool:
        """True while the VMM process is alive."""
        ...

    async def open_agent_stream(self, timeout_s: float) -> AgentStream:
        """A fresh byte stream to the guest agent (retries until the VMM accepts)."""
        ...

    def console_tail(self, max_bytes: int = 8192) -> str:
        """The last bytes the guest wrote to its console, decoded leniently."""
        ...

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...

    async def snapshot(self, dest: Path, *, stop: bool = False) -> SnapshotFiles:
        """Save memory, device state and disk into ``dest`` (a new directory).

        The guest is paused for the save and then resumed; with ``stop`` the VMM ends
        instead (its disk moves into ``dest``, and nothing else of it stays): that is
        how a sandbox is paused to disk. On failure ``dest`` is removed and the VM is as
        before (running, or paused when it was).
        """
        ...

    async def wait(self) -> int:
        """Wait for the VMM process to end; its exit status (-1 for an adopted process,
        whose status goes to its real parent)."""
        ...

    async def kill(self) -> None:
        """End the VMM and remove every file it had. Idempotent; safe on cancellation.

        Read :meth:`console_tail` first if you want it: the console log goes too.
        """
        ...

    async def release(self) -> None:
        """Stop managing the VM but leave it running (a detached VM at server shutdown).

        A later process re-adopts it with :meth:`Driver.attach`.
        """
        ...


class Driver(Protocol):
    """A VMM driver, picked by name (``qemu``, ``firecracker``)."""

    name: str

    def version(self) -> str:
        """The VMM's version string (part of snapshot compatibility keys)."""
        ...

    def snapshot_key(self) -> str:
        """What a snapshot must have been made under to load here: VMM, version and
        anything else that changes the machine (QEMU's accelerator picks the machine)."""
        ...

    async def start(self, config: VMConfig) -> VM:
        """Start the VMM for ``config``; returns once the process is up (not the guest)."""
        ...

    async def restore(
        self, config: VMConfig, snapshot: SnapshotFiles, *, adopt_disk: bool = False
    ) -> VM:
        """Start a VMM from a snapshot; returns once the guest runs again.

        The new VM writes to its own copy-on-write layer over the snapshot's disk, which
        stays untouched, so one snapshot can be restored many times. With ``adopt_disk``
        the snapshot's disk itself moves into the VM (resuming a paused sandbox, whose
        snapshot is used once). Raises SnapshotMismatch when another VMM, version or VM
        shape wrote it, and SnapshotCorrupt naming the file that could not be loaded.
        """
        ...

    async def attach(self, config: VMConfig, pid: int) -> VM:
        """Re-adopt a VMM left running by an earlier server process."""
        ...


@runtime_checkable
class Prelaunching(Driver, Protocol):
    """A driver that can start a VMM ahead of a restore (QEMU: ``-incoming defer``), so
    that a later restore only loads the saved state into it."""

    async def prelaunch(
        self,
        config: VMConfig,
        snapshot: SnapshotFiles,
        *,
        adopt_disk: bool = False,
        load_state: bool = False,
    ) -> VM:
        """The VMM for ``config``, started and waiting for ``snapshot``'s state (with
        ``load_state``: the state loaded, the guest paused and never run)."""
        ...

    async def restore(
        self,
        config: VMConfig,
        snapshot: SnapshotFiles,
        *,
        adopt_disk: bool = False,
        prelaunched: Any = None,
    ) -> VM:
        """As :meth:`Driver.restore`; with ``prelaunched`` (from :meth:`prelaunch` for
        this config and snapshot) only the state is loaded into it."""
        ...
