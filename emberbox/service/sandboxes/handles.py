"""What the sandbox manager drives and reports: the Protocols of a running sandbox
(:class:`SandboxHandle`) and of the ways one comes to be (start, restore, attach), the
image catalog, and :class:`SandboxRecord`, a sandbox as the service reports it.

The real implementations are :class:`emberbox.service.vm.machine.SandboxVM` and
:class:`emberbox.service.vm.launch.Launcher`; unit tests pass fakes of the same shape.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

from emberbox.agent_client.calls import AgentCalls, OutputCallback
from emberbox.config import Settings
from emberbox.service.sandboxes.state import SandboxState
from emberbox.store import SandboxRow
from emberbox.vmm.base import Lifetime, SnapshotFiles


class SandboxHandle(Protocol):
    """A running sandbox as the manager drives it (``emberbox.service.vm.machine.SandboxVM``).

    Its guest is reached through ``agent`` (exec, processes, files); read it at each use,
    as it is a new connection after a snapshot that lost the old one.
    """

    @property
    def id(self) -> str: ...
    @property
    def pid(self) -> int | None: ...
    @property
    def work_dir(self) -> Path: ...
    @property
    def agent(self) -> AgentCalls: ...
    def is_running(self) -> bool: ...
    def end_reason(self) -> str | None:
        """Why it stopped running when that is known (its agent broke the protocol)."""

    async def kill(self) -> None:
        """End the VMM and remove its work dir. Idempotent."""

    async def detach(self) -> None:
        """Close the agent connection and leave the VMM running. Idempotent."""

    async def snapshot(self, dest: Path, *, stop: bool = False) -> SnapshotFiles:
        """Save the VM into ``dest``; with ``stop`` the VM ends (pause to disk)."""

    async def greet(self, sandbox_id: str, *, unless_within_s: float = 0.0) -> object:
        """Fresh entropy, clock, hostname and id (a pooled sandbox being handed out);
        not sent again when its last hello is less than ``unless_within_s`` old."""


class SandboxFactory(Protocol):
    """``SandboxVM.start``: boot a sandbox; returns after the agent handshake."""

    def __call__(
        self,
        settings: Settings,
        *,
        image: str,
        vcpus: int,
        memory_mib: int,
        sandbox_id: str,
        lifetime: Lifetime,
    ) -> Awaitable[SandboxHandle]: ...


class SandboxRestorer(Protocol):
    """``SandboxVM.restore``: start a sandbox from a snapshot; returns after the hello."""

    def __call__(
        self,
        settings: Settings,
        snapshot: SnapshotFiles,
        *,
        image: str,
        vcpus: int,
        memory_mib: int,
        sandbox_id: str,
        lifetime: Lifetime,
        adopt_disk: bool,
    ) -> Awaitable[SandboxHandle]: ...


class SandboxAttacher(Protocol):
    """``SandboxVM.attach``: re-adopt a VMM left running by an earlier server."""

    def __call__(
        self,
        settings: Settings,
        *,
        sandbox_id: str,
        pid: int,
        image: str,
        vcpus: int,
        memory_mib: int,
    ) -> Awaitable[SandboxHandle]: ...


class ImageCatalog(Protocol):
    """``ImageRegistry``: which images exist (``get`` raises ``errors.ImageNotFound``)."""

    def names(self) -> list[str]: ...
    def get(self, name: str) -> object: ...


@dataclass(frozen=True)
class SandboxRecord:
    """A sandbox as the service reports it. Times are UTC."""

    id: str
    state: SandboxState
    image: str
    vcpus: int
    memory_mib: int
    metadata: dict[str, str]
    env: dict[str, str]
    timeout_s: int
    created_at: datetime
    expires_at: datetime
    ip_address: str | None
    vmm_pid: int | None
    work_dir: Path | None
    error: str | None
    snapshot_id: str | None = None  # the snapshot this sandbox was forked from

    @classmethod
    def from_row(cls, row: SandboxRow) -> SandboxRecord:
        return cls(
            id=row.id,
            state=SandboxState(row.state),
            image=row.image,
            vcpus=row.vcpus,
            memory_mib=row.memory_mib,
            metadata=dict(row.metadata),
            env=dict(row.env),
            timeout_s=row.timeout_s,
            created_at=row.created_at,
            expires_at=row.expires_at,
            ip_address=row.ip_address,
            vmm_pid=row.vmm_pid,
            work_dir=row.work_dir,
            error=row.error,
            snapshot_id=row.snapshot_id,
        )


# -- the real implementations, imported late (they pull in the VMM drivers) ------------------


def default_handles() -> tuple[SandboxFactory, SandboxAttacher, SandboxRestorer]:
    """The real start (template restore, cold boot as fallback), attach and restore."""
    from emberbox.service.vm.launch import Launcher

    launcher = Launcher()
    return launcher.start, launcher.attach, launcher.restore


def default_registry(settings: Settings) -> ImageCatalog:
    from emberbox.images.registry import ImageRegistry

    return ImageRegistry(settings)


__all__ = [
    "ImageCatalog",
    "OutputCallback",
    "SandboxAttacher",
    "SandboxFactory",
    "SandboxHandle",
    "SandboxRecord",
]
