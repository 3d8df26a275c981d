"""Stand-ins for what the sandbox manager drives, without VMs: :class:`FakeSandbox` (a
running sandbox, optionally with a sleeping process standing in for its VMM),
:class:`FakeVMM` (its start and attach), :class:`FakeImages` (the image catalog) and
:class:`Thing` (what the warm pool keeps)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from emberbox import errors
from emberbox.agent_client.answers import ExecResult, FileInfo
from emberbox.agent_client.calls import OutputCallback
from emberbox.agent_client.spec import ExecSpec, SpawnSpec
from emberbox.config import Settings
from emberbox.vmm.base import Lifetime, SnapshotFiles
from tests.support.fakes_guest import FakeGuest

if TYPE_CHECKING:
    from emberbox.agent_client.calls import AgentCalls
    from emberbox.service.sandboxes.handles import (
        ImageCatalog,
        SandboxAttacher,
        SandboxFactory,
        SandboxHandle,
    )
    from emberbox.service.vm.pool import Pooled


def spawn_vmm(work_dir: Path) -> subprocess.Popen[bytes]:
    """A stand-in VMM process: sleeps, and its argv names a file in ``work_dir``."""
    return subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", str(work_dir / "agent.sock")]
    )


def end_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


class SandboxAgent(FakeGuest):
    """A :class:`FakeSandbox`'s agent: exec answers ``ok``, spawn answers pid 7, and both
    record what they were asked; calls fail as a closed channel once the sandbox died."""

    def __init__(self, sandbox: FakeSandbox) -> None:
        super().__init__(sandbox.id)
        self.sandbox = sandbox

    def _check_alive(self) -> None:
        if not self.sandbox.running:
            raise errors.AgentDisconnected("agent channel closed")

    async def exec(
        self,
        spec: ExecSpec,
        *,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> ExecResult:
        self._check_alive()
        self.sandbox.exec_calls.append(
            {
                "cmd": spec.command,
                "env": dict(spec.env),
                "cwd": spec.cwd,
                "timeout_s": spec.timeout_s,
                "max": spec.output_max_bytes,
            }
        )
        await anyio.sleep(self.sandbox.exec_delay_s)
        self._check_alive()
        return ExecResult(exit_code=0, stdout=b"ok\n", stderr=b"", duration_ms=1.5)

    async def spawn(self, spec: SpawnSpec) -> int:
        kwargs = {"env": dict(spec.env), "cwd": spec.cwd, "timeout_s": spec.timeout_s}
        self.sandbox.spawned.append((spec.command, {**kwargs, "pty": spec.pty}))
        return 7

    async def stat(self, path: str) -> FileInfo:
        if self.sandbox.stat_hook is not None:
            await self.sandbox.stat_hook()
        self._check_alive()
        return await super().stat(path)


class FakeSandbox:
    """Behaves like emberbox.service.vm.machine's sandbox, minus the VM."""

    def __init__(self, sandbox_id: str, work_dir: Path, proc: subprocess.Popen[bytes] | None):
        self.id = sandbox_id
        self._work_dir = work_dir
        self.proc = proc
        self.running = True
        self.kills = 0
        self.detached = False
        self.attached_pid: int | None = None  # the pid it was re-adopted with
        self.exec_delay_s = 0.0
        self.exec_calls: list[dict[str, object]] = []
        self.spawned: list[tuple[list[str] | str, dict[str, object]]] = []
        self.stat_hook: Callable[[], Awaitable[object]] | None = None
        self.agent = SandboxAgent(self)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def work_dir(self) -> Path:
        return self._work_dir

    def is_running(self) -> bool:
        return self.running

    def end_reason(self) -> str | None:
        return None

    async def kill(self) -> None:
        self.kills += 1
        self.running = False
        if self.proc is not None:
            end_process(self.proc)
        shutil.rmtree(self._work_dir, ignore_errors=True)

    async def detach(self) -> None:
        self.detached = True

    async def snapshot(self, dest: Path, *, stop: bool = False) -> SnapshotFiles:
        raise NotImplementedError("FakeSandbox does not snapshot")

    async def greet(self, sandbox_id: str, *, unless_within_s: float = 0.0) -> object:
        raise NotImplementedError("FakeSandbox is never pooled")


class FakeVMM:
    """Sandbox start / attach stand-ins that record what they were asked."""

    def __init__(self, *, spawn: bool = False) -> None:
        self.spawn = spawn
        self.started: dict[str, FakeSandbox] = {}
        self.attached: dict[str, FakeSandbox] = {}
        self.lifetimes: list[Lifetime] = []
        self.fail_with: Exception | None = None
        self.attach_fails = False
        self.gate: anyio.Event | None = None
        self.booting = anyio.Event()
        self.boot_cancelled = False
        self.procs: list[subprocess.Popen[bytes]] = []

    async def start(
        self,
        settings: Settings,
        *,
        image: str,
        vcpus: int,
        memory_mib: int,
        sandbox_id: str,
        lifetime: Lifetime,
    ) -> FakeSandbox:
        self.lifetimes.append(lifetime)
        work_dir = settings.vms_dir / sandbox_id
        work_dir.mkdir()
        self.booting.set()
        try:
            if self.gate is not None:
                await self.gate.wait()
        except anyio.get_cancelled_exc_class():
            self.boot_cancelled = True
            shutil.rmtree(work_dir)
            raise
        if self.fail_with is not None:
            shutil.rmtree(work_dir)
            raise self.fail_with
        proc = spawn_vmm(work_dir) if self.spawn else None
        if proc is not None:
            self.procs.append(proc)
        sandbox = self.started[sandbox_id] = FakeSandbox(sandbox_id, work_dir, proc)
        return sandbox

    async def attach(
        self,
        settings: Settings,
        *,
        sandbox_id: str,
        pid: int,
        image: str,
        vcpus: int,
        memory_mib: int,
    ) -> FakeSandbox:
        if self.attach_fails:
            raise errors.AgentDisconnected("agent did not answer")
        sandbox = FakeSandbox(sandbox_id, settings.vms_dir / sandbox_id, None)
        sandbox.attached_pid = pid
        self.attached[sandbox_id] = sandbox
        return sandbox


class FakeImages:
    """Two images, ``default`` and ``python``; ``get`` answers the name."""

    def names(self) -> list[str]:
        return ["default", "python"]

    def get(self, name: str) -> object:
        if name not in self.names():
            raise errors.ImageNotFound(name, self.names())
        return name


class Thing:
    """What a warm pool keeps: an id, and whether it was killed."""

    def __init__(self, sandbox_id: str) -> None:
        self.id = sandbox_id
        self.killed = False

    async def kill(self) -> None:
        self.killed = True


if TYPE_CHECKING:
    _sandbox = FakeSandbox("sb", Path(), None)
    _handle: SandboxHandle = _sandbox
    _agent: AgentCalls = _sandbox.agent
    _factory: SandboxFactory = FakeVMM().start
    _attacher: SandboxAttacher = FakeVMM().attach
    _catalog: ImageCatalog = FakeImages()
    _pooled: Pooled = Thing("sb")
