"""In-memory stand-ins for SandboxManager and ImageRegistry, and the real app over them,
for the API, SDK and CLI unit tests.

The fake manager's process and file calls are the real services
(``emberbox.service.guestio.processes`` / ``.files``) over a :class:`FakeGuest` per
sandbox; its records are real :class:`SandboxRecord`\\ s."""

from __future__ import annotations

import builtins
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emberbox import errors
from emberbox.agent_client.answers import ExecResult
from emberbox.agent_client.calls import OutputCallback
from emberbox.agent_client.spec import ExecSpec
from emberbox.config import Settings
from emberbox.service.guestio.files import SandboxFiles
from emberbox.service.guestio.ports import SandboxPorts
from emberbox.service.guestio.processes import Processes
from emberbox.service.sandboxes.handles import SandboxRecord
from emberbox.service.sandboxes.state import SandboxState
from emberbox.service.snapshots.records import SnapshotRecord
from emberbox.vmm.base import BootFiles, SnapshotFiles
from tests.support.fakes_guest import FakeGuest

if TYPE_CHECKING:
    from fastapi import FastAPI

    from emberbox.service.guestio.common import LiveSandboxes
    from emberbox.service.oneshot.runner import ImageHashes, RunManager
    from emberbox.service.sandboxes.handles import ImageCatalog, SandboxHandle

FILE_NAMES = {"kernel": "vmlinuz", "vmlinux": "vmlinux", "initrd": "initramfs.cpio"}
FILE_NAMES["rootfs"] = "rootfs.ext4"
# A fork in one of these states still needs its snapshot (as in SandboxManager).
IN_USE_STATES = frozenset(SandboxState) - {SandboxState.STOPPED, SandboxState.ERROR}


@dataclass(frozen=True)
class FakeImage:
    name: str
    directory: Path
    manifest: dict[str, Any]
    files: BootFiles
    size_bytes: int
    created_at: datetime


class FakeRegistry:
    """Images are directories ``root/<name>/`` holding the four guest files."""

    def __init__(self, root: Path, names: tuple[str, ...] = ("default", "python")) -> None:
        self.root = root
        for name in names:
            directory = root / name
            directory.mkdir(parents=True, exist_ok=True)
            for file_name in FILE_NAMES.values():
                (directory / file_name).write_bytes(b"x")

    def list(self) -> list[FakeImage]:
        return [self.get(path.name) for path in sorted(self.root.iterdir())]

    def names(self) -> builtins.list[str]:
        return [path.name for path in sorted(self.root.iterdir())]

    def get(self, name: str) -> FakeImage:
        directory = self.root / name
        if "/" in name or not directory.is_dir():
            raise errors.ImageNotFound(name, self.names())
        files = BootFiles(**{kind: directory / f for kind, f in FILE_NAMES.items()})
        created = datetime(2026, 1, 1, tzinfo=UTC)
        manifest = {"kernel": {"release": "6.6.1"}}
        return FakeImage(name, directory, manifest, files, 4096, created)

    def find_by_path(self, path: str) -> tuple[FakeImage, str] | None:
        wanted = Path(path).resolve()
        for image in self.list():
            for kind in FILE_NAMES:
                if getattr(image.files, kind).resolve() == wanted:
                    return image, kind
        return None


class GuestHandle:
    """A running sandbox whose guest is a :class:`FakeGuest` (no VMM behind it)."""

    def __init__(self, sandbox_id: str, work_dir: Path) -> None:
        self.id = sandbox_id
        self.pid: int | None = None
        self.work_dir = work_dir
        self.agent = FakeGuest(sandbox_id)
        self.running = True

    def is_running(self) -> bool:
        return self.running

    def end_reason(self) -> str | None:
        return None

    async def kill(self) -> None:
        self.running = False

    async def detach(self) -> None:
        pass

    async def snapshot(self, dest: Path, *, stop: bool = False) -> SnapshotFiles:
        self.running = self.running and not stop
        return SnapshotFiles(dest, "fake", "0")

    async def greet(self, sandbox_id: str, *, unless_within_s: float = 0.0) -> object:
        self.id = sandbox_id
        return None


class FakeManager:
    """SandboxManager's methods over dicts. ``exec`` echoes its command and stdin."""

    def __init__(self, settings: Settings, registry: FakeRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self.records: dict[str, SandboxRecord] = {}
        self.snapshots: dict[str, SnapshotRecord] = {}
        self.calls: builtins.list[tuple[str, dict[str, Any]]] = []
        self.raise_on_exec: Exception | None = None
        self._ids = itertools.count(1)
        self.handles: dict[str, GuestHandle] = {}
        self.processes = Processes(self, settings)
        self.files = SandboxFiles(self, settings)
        self.ports = SandboxPorts(self, settings)

    @property
    def guests(self) -> dict[str, FakeGuest]:
        """Each sandbox's guest agent, by sandbox id."""
        return {sandbox_id: handle.agent for sandbox_id, handle in self.handles.items()}

    async def create(
        self,
        *,
        image: str | None = None,
        vcpus: int | None = None,
        memory_mib: int | None = None,
        timeout_s: int | None = None,
        metadata: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
        snapshot_id: str | None = None,
        tenant_id: str = "local",
        network: Mapping[str, object] | None = None,
    ) -> SandboxRecord:
        s = self.settings
        self.calls.append(("create", {"image": image, "metadata": metadata}))
        if snapshot_id is not None:
            image, vcpus, memory_mib = await self._fork_shape(snapshot_id, image, vcpus, memory_mib)
        name = self.registry.get(image or s.default_image).name
        vcpus = vcpus or s.default_vcpus
        if vcpus > s.max_vcpus:
            raise errors.InvalidRequest(f"vcpus {vcpus} is over the limit of {s.max_vcpus}")
        if len(self.live()) >= s.max_sandboxes:
            raise errors.QuotaExceeded(f"{s.max_sandboxes} sandboxes are running already")
        now = datetime.now(UTC)
        timeout_s = timeout_s or s.default_timeout_s
        sandbox_id = f"sb-{next(self._ids)}"
        record = SandboxRecord(
            id=sandbox_id,
            state=SandboxState.RUNNING,
            image=name,
            vcpus=vcpus,
            memory_mib=memory_mib or s.default_memory_mib,
            metadata=dict(metadata or {}),
            env=dict(env or {}),
            timeout_s=timeout_s,
            created_at=now,
            expires_at=now + timedelta(seconds=timeout_s),
            ip_address="10.0.0.2",
            vmm_pid=4242,
            work_dir=Path(f"/nonexistent/vms/{sandbox_id}"),
            error=None,
            snapshot_id=snapshot_id,
        )
        self.records[sandbox_id] = record
        self.handles[sandbox_id] = GuestHandle(sandbox_id, Path(f"/nonexistent/vms/{sandbox_id}"))
        return record

    async def running_handle(self, sandbox_id: str) -> tuple[SandboxRecord, GuestHandle]:
        record = await self.get(sandbox_id)
        if record.state is not SandboxState.RUNNING:
            raise errors.Conflict(f"sandbox {sandbox_id} is {record.state.value}")
        return record, self.handles[sandbox_id]

    async def _fork_shape(
        self, snapshot_id: str, image: str | None, vcpus: int | None, memory_mib: int | None
    ) -> tuple[str, int, int]:
        snap = await self.get_snapshot(snapshot_id)
        asked = {"image": image, "vcpus": vcpus, "memory_mib": memory_mib}
        for field, value in asked.items():
            if value is not None and value != getattr(snap, field):
                raise errors.SnapshotMismatch(
                    f"snapshot {snapshot_id} has {field} {getattr(snap, field)}, not {value}"
                )
        return snap.image, snap.vcpus, snap.memory_mib

    def live(self) -> builtins.list[SandboxRecord]:
        return [r for r in self.records.values() if r.state is SandboxState.RUNNING]

    async def get(self, sandbox_id: str) -> SandboxRecord:
        try:
            return self.records[sandbox_id]
        except KeyError:
            raise errors.NotFound(f"no sandbox {sandbox_id!r}") from None

    async def list(
        self,
        *,
        state: SandboxState | None = None,
        metadata: dict[str, str] | None = None,
        tenant_id: str | None = None,  # the fake's records have no owner: all
    ) -> builtins.list[SandboxRecord]:
        self.calls.append(("list", {"state": state, "metadata": metadata}))
        return [
            r
            for r in self.records.values()
            if (state is None or r.state is state)
            and all(r.metadata.get(k) == v for k, v in (metadata or {}).items())
        ]

    async def exec(
        self,
        sandbox_id: str,
        spec: ExecSpec,
        *,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> ExecResult:
        record = await self.get(sandbox_id)
        call = {"cmd": spec.command, "env": dict(spec.env), "cwd": spec.cwd, "stdin": spec.stdin}
        self.calls.append(("exec", call))
        if record.state is not SandboxState.RUNNING:
            raise errors.Conflict(f"sandbox {sandbox_id} is {record.state.value}")
        if self.raise_on_exec is not None:
            raise self.raise_on_exec
        guest = self.handles[sandbox_id].agent
        return await guest.exec(spec, on_stdout=on_stdout, on_stderr=on_stderr)

    async def kill(self, sandbox_id: str) -> None:
        record = await self.get(sandbox_id)
        self.records[sandbox_id] = replace(record, state=SandboxState.STOPPED, ip_address=None)

    async def set_timeout(self, sandbox_id: str, timeout_s: int) -> SandboxRecord:
        record = await self.get(sandbox_id)
        if record.state is not SandboxState.RUNNING:
            raise errors.Conflict(f"sandbox {sandbox_id} is {record.state.value}")
        expires = datetime.now(UTC) + timedelta(seconds=timeout_s)
        self.records[sandbox_id] = replace(record, timeout_s=timeout_s, expires_at=expires)
        return self.records[sandbox_id]

    async def image_names(self) -> builtins.list[str]:
        return self.registry.names()

    async def pause(self, sandbox_id: str) -> SandboxRecord:
        return await self._move(sandbox_id, SandboxState.RUNNING, SandboxState.PAUSED)

    async def resume(self, sandbox_id: str) -> SandboxRecord:
        return await self._move(sandbox_id, SandboxState.PAUSED, SandboxState.RUNNING)

    async def _move(self, sandbox_id: str, src: SandboxState, dst: SandboxState) -> SandboxRecord:
        record = await self.get(sandbox_id)
        if record.state is not src:
            raise errors.Conflict(f"sandbox {sandbox_id} is {record.state.value}, not {src.value}")
        self.records[sandbox_id] = replace(record, state=dst)
        return self.records[sandbox_id]

    async def snapshot(self, sandbox_id: str) -> SnapshotRecord:
        record = await self.get(sandbox_id)
        if record.state is not SandboxState.RUNNING:
            raise errors.Conflict(f"sandbox {sandbox_id} is {record.state.value}")
        snapshot_id = f"snap-{next(self._ids)}"
        self.snapshots[snapshot_id] = SnapshotRecord(
            id=snapshot_id,
            sandbox_id=sandbox_id,
            image=record.image,
            vcpus=record.vcpus,
            memory_mib=record.memory_mib,
            vmm="qemu",
            vmm_version="9.0.0",
            size_bytes=record.memory_mib * 2**20,
            created_at=datetime.now(UTC),
            path=Path(f"/nonexistent/snapshots/{snapshot_id}"),
        )
        return self.snapshots[snapshot_id]

    async def list_snapshots(
        self, sandbox_id: str | None = None, *, tenant_id: str | None = None
    ) -> builtins.list[SnapshotRecord]:
        self.calls.append(("list_snapshots", {"sandbox_id": sandbox_id}))
        found = [s for s in self.snapshots.values() if sandbox_id in (None, s.sandbox_id)]
        return sorted(found, key=lambda s: (s.created_at, s.id))

    async def drop_spares(self, image: str) -> None:
        self.calls.append(("drop_spares", {"image": image}))

    async def get_snapshot(self, snapshot_id: str) -> SnapshotRecord:
        try:
            return self.snapshots[snapshot_id]
        except KeyError:
            raise errors.NotFound(f"no snapshot {snapshot_id}") from None

    async def delete_snapshot(self, snapshot_id: str) -> None:
        await self.get_snapshot(snapshot_id)
        users = [
            r.id
            for r in self.records.values()
            if r.snapshot_id == snapshot_id and r.state in IN_USE_STATES
        ]
        if users:
            raise errors.Conflict(f"snapshot {snapshot_id} is in use by {', '.join(users)}")
        del self.snapshots[snapshot_id]


def fake_app(tmp_path: Path, settings: Settings | None = None) -> tuple[FastAPI, FakeManager]:
    """The real app over a FakeManager and a FakeRegistry under ``tmp_path``."""
    from emberbox.api import create_app

    settings = settings or Settings(data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")
    registry = FakeRegistry(tmp_path / "images")
    manager = FakeManager(settings, registry)
    return create_app(settings, manager, registry=registry), manager  # type: ignore[arg-type]


if TYPE_CHECKING:
    _registry = FakeRegistry(Path())
    _catalog: ImageCatalog = _registry
    _hashes: ImageHashes = _registry
    _manager = FakeManager(Settings(), _registry)
    _live: LiveSandboxes = _manager
    _runs: RunManager = _manager
    _handle: SandboxHandle = GuestHandle("sb", Path())
