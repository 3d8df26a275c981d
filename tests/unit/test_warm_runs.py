"""The host side of warm runs: what a template of which image warms up, and which
one-shot runs ask for the warm runtime (pure; no VM)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest
from anyio.abc import TaskGroup

from emberbox import errors
from emberbox.agent_client.client import AgentClient, ExecResult, ExecSpec, WarmProgram
from emberbox.config import Settings
from emberbox.images.registry import ImageInfo, guest_files
from emberbox.service.oneshot.plan import NOBODY, RunSpec, plan_run
from emberbox.service.oneshot.runner import run_code, warm_program
from emberbox.service.vm.templates import WARM_UP, warm_up_plan
from tests.support.fakes_run import ScriptedManager, exec_result


def _image(name: str, **manifest: Any) -> ImageInfo:
    directory = Path("/nonexistent") / name
    return ImageInfo(name, directory, manifest, guest_files(directory), 0, datetime.now(UTC))


def test_only_the_run_image_gets_warm_runtimes_and_toolchains() -> None:
    """The run image's template starts python3's warm runtime and reads node, gcc and
    g++ into the page cache; other images only run the common warm-up."""
    line, runtimes = warm_up_plan(_image("polyglot"), "polyglot")
    assert runtimes == ["python3"]
    assert line.startswith(WARM_UP) and all(t in line for t in ("node -e 0", "gcc", "g++"))
    assert warm_up_plan(_image("default"), "polyglot") == (WARM_UP, [])


def test_a_foreign_userland_gets_no_python_warm_up() -> None:
    """An image whose manifest says its userland is foreign warms nothing of python's,
    even when it is the run image."""
    assert warm_up_plan(_image("alpine", userland="foreign"), "alpine") == ("true", [])
    assert "command -v python3" in WARM_UP  # and without the manifest entry, python3 is optional


def test_python_without_stdin_asks_for_the_warm_runtime_as_nobody() -> None:
    """python3 with args and no stdin runs warm as nobody; stdin, or another language,
    takes the normal start."""
    settings = Settings()
    plan = plan_run(settings, RunSpec("python3", "print(1)", args=["a"]))
    assert warm_program(plan) == WarmProgram("python3", "main.py", ["a"], NOBODY, NOBODY)
    assert warm_program(plan_run(settings, RunSpec("python3", "x", stdin="in"))) is None
    assert warm_program(plan_run(settings, RunSpec("bash", "echo 1"))) is None
    assert warm_program(plan_run(settings, RunSpec("node", "1"))) is None


class _BackgroundManager(ScriptedManager):
    """A ScriptedManager with a task group of its own, like SandboxManager's."""

    def __init__(self, group: TaskGroup) -> None:
        super().__init__()
        self.group = group

    def in_background(
        self, func: Callable[[str], Coroutine[None, None, None]], arg: str, /
    ) -> bool:
        self.calls.append(("background", arg))
        self.group.start_soon(func, arg)
        return True


@pytest.mark.anyio
async def test_the_runs_sandbox_is_killed_in_the_managers_task_group() -> None:
    """run_code answers before the kill ran; the manager's task group then kills it."""
    async with anyio.create_task_group() as group:
        manager = _BackgroundManager(group)
        result = await run_code(manager, Settings(), RunSpec("bash", "echo 1"))
        assert result.status == "ok"
        assert manager.calls[-1] == ("background", "sb-1")
    assert manager.calls[-1] == ("kill", "sb-1")


@pytest.mark.anyio
async def test_without_a_task_group_the_kill_is_awaited() -> None:
    """A manager without ``in_background`` (or one that is closed) kills before the answer."""
    manager = ScriptedManager()
    await run_code(manager, Settings(), RunSpec("bash", "echo 1"))
    assert manager.calls[-1] == ("kill", "sb-1")


class _OldAgent(AgentClient):
    """An agent from before the run op: it answers ``run`` with "unknown op"."""

    def __init__(self) -> None:  # no stream: only ``run`` is called
        self.asked = 0

    async def run(self, spec: ExecSpec, **kwargs: Any) -> tuple[ExecResult, bool]:
        self.asked += 1
        raise errors.InvalidRequest("unknown op 'run'")


class _HandleManager(ScriptedManager):
    """A ScriptedManager that hands out ``agent`` as the sandbox's agent."""

    def __init__(self, agent: AgentClient) -> None:
        super().__init__(lambda argv: exec_result(stdout=b"1\n"))
        self.agent = agent

    async def running_handle(self, sandbox_id: str, /) -> tuple[object, Any]:
        return None, SimpleNamespace(agent=self.agent)


@pytest.mark.anyio
async def test_an_agent_without_the_run_op_gets_tar_in_and_exec() -> None:
    """An image built before the run op still runs: the files by tar_in, then exec."""
    agent = _OldAgent()
    manager = _HandleManager(agent)
    result = await run_code(manager, Settings(), RunSpec("python3", "print(1)"))
    assert result.status == "ok" and result.stdout == b"1\n" and not result.warm
    assert agent.asked == 1
    assert [name for name, _ in manager.calls] == ["create", "tar_in", "exec", "kill"]
