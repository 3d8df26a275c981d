"""The driver interface every virtual machine monitor implements.

A driver turns a :class:`VMConfig` into a running :class:`VM` and gives back a byte
stream to the guest agent. It knows nothing of HTTP, users or SQLite. Readiness (the
agent's handshake) and the boot watchdog live in :mod:`emberbox.vmm.boot`, shared by
all drivers; drivers only start, connect, pause, snapshot and kill.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

AgentStream = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Lifetime = Literal["ephemeral", "detached"]


@dataclass(frozen=True)
class GuestFiles:
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
    guest: GuestFiles
    vcpus: int = 1
    memory_mib: int = 512
    kernel_args: tuple[str, ...] = ()
    console_log_max_bytes: int = 1 << 20
    # "ephemeral": the VM dies with the process that booted it (library use, CLI run).
    # "detached": the VM outlives its parent so that a restarted server can re-attach.
    lifetime: Lifetime = "ephemeral"
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SnapshotFiles:
    """A saved VM: device state + memory + the disk as it was, in one directory."""

    directory: Path
    vmm: str  # driver name that wrote it
    vmm_version: str


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

    async def snapshot(self, dest: Path) -> SnapshotFiles:
        """Save memory, device state and disk into ``dest`` (VM paused meanwhile)."""
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

    async def start(self, config: VMConfig) -> VM:
        """Start the VMM for ``config``; returns once the process is up (not the guest)."""
        ...

    async def restore(self, config: VMConfig, snapshot: SnapshotFiles) -> VM:
        """Start a VMM from a snapshot; returns once the process is up."""
        ...

    async def attach(self, config: VMConfig, pid: int) -> VM:
        """Re-adopt a VMM left running by an earlier server process."""
        ...
