"""The walking skeleton end to end: real VMs booted, commands run through the agent."""

from __future__ import annotations

import asyncio
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from emberbox.agent_client.spec import ExecSpec
from emberbox.config import Settings
from emberbox.errors import AgentDisconnected, ImageNotFound, InvalidRequest, VMMCrashed
from emberbox.service.vm.machine import SandboxVM
from emberbox.vmm import cgroups
from tests.support.paths import qemu_pids_under

pytestmark = [pytest.mark.vm, pytest.mark.anyio]
Factory = Callable[..., Awaitable[SandboxVM]]


async def test_exec_runs_inside_the_guest(sandbox_factory: Factory) -> None:
    """A command's stdout, stderr and exit code come back separately, from the guest."""
    sb = await sandbox_factory()
    result = await sb.agent.exec(ExecSpec(["sh", "-c", "uname -r; echo err >&2; exit 3"]))
    assert result.exit_code == 3
    assert result.stderr == b"err\n"
    assert result.stdout.decode().strip() == sb.hello.kernel
    assert result.stdout.decode().strip() != platform.release()
    python = await sb.agent.exec(ExecSpec(["python3", "-c", "print(6*7)"]))
    assert (python.exit_code, python.stdout) == (0, b"42\n")


async def test_env_cwd_stdin_and_missing_program(sandbox_factory: Factory) -> None:
    """Env, cwd and stdin reach the command; a missing program exits 127."""
    sb = await sandbox_factory()
    spec = ExecSpec(
        "echo $GREETING; pwd; cat", env={"GREETING": "hi"}, cwd="/tmp", stdin=b"from stdin"
    )
    result = await sb.agent.exec(spec)
    assert result.stdout == b"hi\n/tmp\nfrom stdin"
    missing = await sb.agent.exec(ExecSpec(["no-such-program"]))
    assert missing.exit_code == 127


async def test_timeout_kills_the_process_group(sandbox_factory: Factory) -> None:
    """A command past its timeout is killed with its children, quickly."""
    sb = await sandbox_factory()
    started = time.monotonic()
    result = await sb.agent.exec(ExecSpec("sleep 60 & sleep 60", timeout_s=2))
    assert result.timed_out
    assert time.monotonic() - started < 15
    left = await sb.agent.exec(ExecSpec("ps -eo comm | grep -c '^sleep$' || true"))
    assert left.stdout.strip() == b"0"


async def test_concurrent_execs_are_not_mixed(sandbox_factory: Factory) -> None:
    """Ten execs at once over the one agent stream each get their own output."""
    sb = await sandbox_factory()
    results = await asyncio.gather(
        *(
            sb.agent.exec(ExecSpec(["sh", "-c", f"sleep 0.{i}; echo {i}; echo e{i} >&2"]))
            for i in range(10)
        )
    )
    for i, result in enumerate(results):
        assert (result.stdout, result.stderr) == (f"{i}\n".encode(), f"e{i}\n".encode())


async def test_output_streams_before_the_command_ends(sandbox_factory: Factory) -> None:
    """Output reaches the caller as it is produced, not at the end."""
    sb = await sandbox_factory()
    arrivals: list[float] = []
    started = time.monotonic()
    result = await sb.agent.exec(
        ExecSpec("for i in 1 2 3; do echo $i; sleep 1; done"),
        on_stdout=lambda _chunk: arrivals.append(time.monotonic() - started),
    )
    assert result.stdout == b"1\n2\n3\n"
    assert arrivals and arrivals[0] < result.duration_ms / 1000 - 1


async def test_unknown_image_names_the_available_ones(settings: Settings) -> None:
    """An unknown image is refused with the list of images, before anything boots."""
    with pytest.raises(ImageNotFound) as info:
        await SandboxVM.start(settings, image="nope")
    assert "default" in info.value.available
    with pytest.raises(InvalidRequest):
        await SandboxVM.start(settings, vcpus=1000)


async def test_vmm_killed_mid_exec_is_a_clear_error(sandbox_factory: Factory) -> None:
    """SIGKILL of the VMM during an exec ends the exec with AgentDisconnected, no hang."""
    sb = await sandbox_factory()
    pending = asyncio.ensure_future(sb.agent.exec(ExecSpec(["sleep", "30"])))
    await asyncio.sleep(0.5)
    assert sb.pid is not None
    os.kill(sb.pid, signal.SIGKILL)
    with pytest.raises((AgentDisconnected, VMMCrashed)):
        await asyncio.wait_for(pending, 10)
    await sb.kill()
    assert not sb.work_dir.exists()


async def test_guest_kernel_crash_disconnects_the_agent(sandbox_factory: Factory) -> None:
    """A guest that crashes its kernel (closing the agent channel) gives AgentDisconnected."""
    sb = await sandbox_factory()
    with pytest.raises(AgentDisconnected):
        await asyncio.wait_for(
            sb.agent.exec(ExecSpec("echo c > /proc/sysrq-trigger; sleep 30")), 30
        )
    assert await asyncio.wait_for(sb.vm.wait(), 10) is not None
    assert "sysrq" in sb.vm.console_tail().lower() or not sb.vm.is_running()


async def test_ten_boots_leave_nothing_behind(settings: Settings) -> None:
    """Ten sandboxes booted and torn down leave no process, socket, overlay or dir."""
    for _ in range(10):
        async with SandboxVM.boot(settings=settings) as sb:
            assert (await sb.agent.exec(ExecSpec(["true"]))).exit_code == 0
            work_dir = sb.work_dir
            assert (work_dir / "overlay.qcow2").exists()
        assert not work_dir.exists()
    assert qemu_pids_under(settings.data_dir) == []
    assert list(settings.vms_dir.iterdir()) == []


def test_killed_owner_leaves_nothing_behind(settings: Settings, tmp_path: Path) -> None:
    """SIGKILL of the process that is booting a sandbox still removes the VM and its files."""
    script = tmp_path / "boot.py"
    script.write_text(
        "import asyncio, sys\n"
        "from emberbox.config import Settings\n"
        "from emberbox.service.vm.machine import SandboxVM\n"
        f"settings = Settings(data_dir={str(settings.data_dir)!r}, vmm={settings.vmm!r})\n"
        "asyncio.run(SandboxVM.start(settings))\n"
    )
    child = subprocess.Popen([sys.executable, str(script)])
    deadline = time.monotonic() + 30
    while not qemu_pids_under(settings.data_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert qemu_pids_under(settings.data_dir), "QEMU never started"
    time.sleep(0.5)  # mid-boot: QEMU runs, the agent has not answered yet
    vm_ids = [entry.name for entry in settings.vms_dir.iterdir()]
    child.kill()
    child.wait()

    def leftovers() -> list[object]:
        groups = [cgroups.existing(vm_id) for vm_id in vm_ids]
        return [
            *qemu_pids_under(settings.data_dir),
            *settings.vms_dir.iterdir(),
            *filter(None, groups),
        ]

    deadline = time.monotonic() + 10
    while leftovers() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert qemu_pids_under(settings.data_dir) == []
    assert list(settings.vms_dir.iterdir()) == []
    assert vm_ids and leftovers() == []  # the VM's host cgroups went too


def read(path: Path) -> str:
    return path.read_text()


async def test_vmm_runs_in_its_own_host_cgroup(
    sandbox_factory: Factory, settings: Settings
) -> None:
    """QEMU is limited host-side (guest RAM + overhead, pids) and its group goes with it."""
    if settings.vmm != "qemu":
        pytest.skip("the Firecracker driver uses the jailer's cgroups")
    found = cgroups.version()
    if found is None:
        pytest.skip("no cgroup filesystem on this host")
    sb = await sandbox_factory(memory_mib=256)
    assert sb.pid is not None
    assert f"/emberbox/{sb.id}" in read(Path(f"/proc/{sb.pid}/cgroup"))
    group = cgroups.existing(sb.id)
    assert group is not None
    limit_file = "memory.max" if found == 2 else "memory.limit_in_bytes"
    expected = (256 + settings.vmm_memory_overhead_mib) << 20
    assert int(read(group.dirs[0] / limit_file)) == expected
    await sb.kill()
    assert cgroups.existing(sb.id) is None
