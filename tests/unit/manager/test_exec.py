"""The manager running commands, background processes and file calls in its sandboxes."""

from __future__ import annotations

import time

import anyio
import pytest

from emberbox import errors
from emberbox.agent_client.client import ExecResult, ExecSpec, SpawnSpec
from emberbox.service.sandboxes.manager import SandboxManager
from tests.support.fakes_sandbox import FakeVMM

pytestmark = pytest.mark.anyio


# -- exec -----------------------------------------------------------------------------------


async def test_exec_merges_env_applies_limits_and_logs(
    manager: SandboxManager, vmm: FakeVMM
) -> None:
    """exec() merges env over the sandbox's, defaults and caps the timeout, logs the call."""
    record = await manager.create(env={"A": "1", "B": "1"})
    result = await manager.exec(record.id, ExecSpec(["echo", "hi"], env={"B": "2"}, cwd="/tmp"))
    assert result.stdout == b"ok\n"
    await manager.exec(record.id, ExecSpec("sleep 1", timeout_s=10_000))
    calls = vmm.started[record.id].exec_calls
    assert calls[0] == {
        "cmd": ["echo", "hi"],
        "env": {"A": "1", "B": "2"},
        "cwd": "/tmp",
        "timeout_s": 30.0,
        "max": 4096,
    }
    assert calls[1]["timeout_s"] == 120.0
    log = await manager.exec_log(record.id)
    assert [(e.command, e.exit_code) for e in log] == [(["echo", "hi"], 0), ("sleep 1", 0)]


@pytest.mark.parametrize(
    ("cmd", "timeout_s"), [([], None), ("", None), (["a\0b"], None), (["true"], 0)]
)
async def test_exec_rejects_bad_input(
    manager: SandboxManager, cmd: list[str] | str, timeout_s: float | None
) -> None:
    """Empty or NUL-bearing commands and non-positive timeouts are InvalidRequest."""
    record = await manager.create()
    with pytest.raises(errors.InvalidRequest):
        await manager.exec(record.id, ExecSpec(cmd, timeout_s=timeout_s))


async def test_exec_on_stopped_is_conflict(manager: SandboxManager) -> None:
    """exec() on a stopped sandbox raises Conflict 'sandbox X is stopped'."""
    record = await manager.create()
    await manager.kill(record.id)
    with pytest.raises(errors.Conflict) as caught:
        await manager.exec(record.id, ExecSpec(["true"]))
    assert str(caught.value) == f"sandbox {record.id} is stopped"


async def test_many_concurrent_execs_in_one_sandbox(manager: SandboxManager, vmm: FakeVMM) -> None:
    """Twenty execs in one sandbox run at once, not one after another."""
    record = await manager.create()
    vmm.started[record.id].exec_delay_s = 0.2
    results: list[ExecResult] = []

    async def run() -> None:
        results.append(await manager.exec(record.id, ExecSpec(["true"])))

    start = time.monotonic()
    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(run)
    assert len(results) == 20
    assert time.monotonic() - start < 2.0


async def test_exec_killed_midway_is_conflict(manager: SandboxManager, vmm: FakeVMM) -> None:
    """An exec whose sandbox is killed under it raises Conflict, not a raw agent error."""
    record = await manager.create()
    vmm.started[record.id].exec_delay_s = 0.3
    raised: list[Exception] = []

    async def run() -> None:
        try:
            await manager.exec(record.id, ExecSpec(["sleep", "5"]))
        except Exception as exc:
            raised.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await anyio.sleep(0.05)
        await manager.kill(record.id)
    assert isinstance(raised[0], errors.Conflict)
    assert str(raised[0]) == f"sandbox {record.id} is stopped"


# -- background processes and files -------------------------------------------------------


async def test_guest_calls_go_to_the_running_sandbox(manager: SandboxManager, vmm: FakeVMM) -> None:
    """manager.processes and manager.files reach the running sandbox's handle (with its
    env merged in); bad commands are refused first, an unknown id is NotFound and a
    stopped sandbox Conflict."""
    record = await manager.create(env={"A": "1"})
    sandbox = vmm.started[record.id]
    assert await manager.processes.spawn(record.id, SpawnSpec("sleep 9", env={"B": "2"})) == 7
    assert sandbox.spawned == [
        ("sleep 9", {"env": {"A": "1", "B": "2"}, "cwd": None, "timeout_s": None, "pty": None})
    ]
    with pytest.raises(errors.InvalidRequest):
        await manager.processes.spawn(record.id, SpawnSpec(" "))
    with pytest.raises(errors.InvalidRequest):
        await manager.files.stat(record.id, "a\0b")
    assert (await manager.files.stat(record.id, "/etc")).path == "/etc"
    with pytest.raises(errors.NotFound):
        await manager.files.stat("nope", "/etc")
    await manager.kill(record.id)
    with pytest.raises(errors.Conflict, match="stopped"):
        await manager.processes.spawn(record.id, SpawnSpec("true"))


async def test_agent_failure_of_a_sandbox_killed_meanwhile_is_a_conflict(
    manager: SandboxManager, vmm: FakeVMM
) -> None:
    """A call whose agent channel closes because the sandbox was killed meanwhile is a
    Conflict (409), not an agent failure (502)."""
    record = await manager.create()
    sandbox = vmm.started[record.id]
    sandbox.stat_hook = lambda: manager.kill(record.id)
    with pytest.raises(errors.Conflict, match="stopped") as caught:
        await manager.files.stat(record.id, "/etc")
    assert isinstance(caught.value.__cause__, errors.AgentDisconnected)
