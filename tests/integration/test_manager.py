"""The sandbox manager over real VMs: create, exec, reap, kill, and a server restart."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import anyio
import pytest

from emberbox.agent_client.spec import ExecSpec
from emberbox.config import Settings
from emberbox.service.sandboxes import orphans
from emberbox.service.sandboxes.manager import SandboxManager, SandboxRecord
from emberbox.service.sandboxes.reconcile import VMM_GONE
from emberbox.service.sandboxes.state import SandboxState

pytestmark = [pytest.mark.vm, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def manager_settings(settings: Settings) -> Settings:
    """The conftest's isolated settings, with a fast reaper."""
    return settings.model_copy(update={"reaper_interval_s": 0.2, "max_sandboxes": 2})


def vmm_alive(record: SandboxRecord) -> bool:
    assert record.vmm_pid is not None and record.work_dir is not None
    return orphans.is_vmm_of(record.vmm_pid, record.work_dir)


async def wait_for_state(
    manager: SandboxManager, sandbox_id: str, state: SandboxState, within_s: float
) -> SandboxRecord:
    with anyio.fail_after(within_s):
        while (record := await manager.get(sandbox_id)).state is not state:  # noqa: ASYNC110
            await anyio.sleep(0.1)
    return record


async def test_create_exec_and_reap_at_timeout(manager_settings: Settings) -> None:
    """A created sandbox runs commands with its env, then the reaper kills it at its timeout."""
    async with SandboxManager(manager_settings) as manager:
        record = await manager.create(timeout_s=600, env={"GREETING": "hello"})
        assert record.state is SandboxState.RUNNING and vmm_alive(record)
        greet = ExecSpec("echo $GREETING $EXTRA", env={"EXTRA": "world"})
        result = await manager.exec(record.id, greet)
        assert (result.exit_code, result.stdout) == (0, b"hello world\n")
        await manager.set_timeout(record.id, 1)
        stopped = await wait_for_state(manager, record.id, SandboxState.STOPPED, within_s=30)
        assert not vmm_alive(record)
        assert stopped.work_dir is not None and not stopped.work_dir.exists()
        assert [e.exit_code for e in await manager.exec_log(record.id)] == [0]


async def test_kill_is_idempotent(manager_settings: Settings) -> None:
    """Concurrent and repeated kills stop the VM once and leave no process or files."""
    async with SandboxManager(manager_settings) as manager:
        record = await manager.create()
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(manager.kill, record.id)
        await manager.kill(record.id)
        assert (await manager.get(record.id)).state is SandboxState.STOPPED
        assert not vmm_alive(record)
        assert record.work_dir is not None and not record.work_dir.exists()


async def test_restart_reattaches_then_notices_a_dead_vmm(manager_settings: Settings) -> None:
    """A sandbox outlives its manager and is re-attached; one whose VMM died becomes error."""
    async with SandboxManager(manager_settings) as first:
        record = await first.create()
        assert (await first.exec(record.id, ExecSpec(["true"]))).exit_code == 0
    assert vmm_alive(record)  # close() left it running

    async with SandboxManager(manager_settings) as second:
        assert (await second.get(record.id)).state is SandboxState.RUNNING
        again = await second.exec(record.id, ExecSpec(["echo", "still here"]))
        assert again.stdout == b"still here\n"

    assert record.vmm_pid is not None
    os.kill(record.vmm_pid, signal.SIGKILL)
    with anyio.fail_after(10):
        while vmm_alive(record):  # noqa: ASYNC110 (polls /proc)
            await anyio.sleep(0.05)
    async with SandboxManager(manager_settings) as third:
        dead = await third.get(record.id)
        assert (dead.state, dead.error) == (SandboxState.ERROR, VMM_GONE)
        await third.kill(record.id)
    assert isinstance(record.work_dir, Path) and not record.work_dir.exists()
