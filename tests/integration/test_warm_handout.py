"""Hand-outs with nothing left to warm (issue 16), over real VMs: a pooled sandbox ran
our warm-up before it was handed out, and the user sees nothing of it; a template clone
starts without the kernel image in QEMU and without huge pages, and its start is timed."""

from __future__ import annotations

import ctypes
import time
from pathlib import Path

import anyio
import pytest

from emberbox.agent_client.spec import ExecSpec
from emberbox.config import Settings
from emberbox.service.sandboxes.manager import SandboxManager
from emberbox.service.vm.machine import SandboxVM
from emberbox.service.vm.pool import HELLO_FRESH_S
from emberbox.vmm.phases import phases_of

pytestmark = [pytest.mark.vm, pytest.mark.anyio]

PR_GET_THP_DISABLE = 42
# Every process of the guest but the agent (PID 1) and this shell and its children,
# with its state: a leftover of the warm-up (a zombie, a process still running) shows.
PROCESSES = (
    'for d in /proc/[0-9]*; do p=${d#/proc/}; [ "$p" = 1 ] || [ "$p" = $$ ] && continue; '
    "s=$(cut -d' ' -f3 $d/stat 2>/dev/null) || continue; "
    "[ \"$(cut -d' ' -f4 $d/stat)\" = $$ ] && continue; "
    'c=$(tr "\\0" " " < $d/cmdline); [ -n "$c" ] && echo "$s $c"; done; true'
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def qemu_argv(pid: int | None) -> list[str]:
    assert pid is not None
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


async def disk_reads(vm: object) -> int:
    """Read requests the VM's disk has served (QEMU's own count)."""
    stats = await (await vm.qmp()).execute("query-blockstats")  # type: ignore[attr-defined]
    return sum(int(s["stats"]["rd_operations"]) for s in stats)


def thp_enabled(pid: int | None) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("THP_enabled:"):
            return line.split()[1]
    return "?"  # a kernel without the field


async def test_a_pooled_sandbox_is_warm_and_shows_nothing_of_it(settings: Settings) -> None:
    async with SandboxManager(settings.model_copy(update={"pool_size": 1})) as manager:
        with anyio.fail_after(120):
            while manager.pool_ready() < 1:  # noqa: ASYNC110
                await anyio.sleep(0.1)
        record = await manager.create()
        handle = manager._core.live[record.id]
        # Made ahead (restored, greeted) and at the hand-out only greeted again.
        prepared = getattr(handle, "prepared_phases", None)
        assert prepared is not None and {"QMP connect", "migrate-incoming", "agent hello"} <= set(
            prepared.as_dict()
        )
        # Handed out within HELLO_FRESH_S of its restore hello: nothing more is sent.
        assert isinstance(handle, SandboxVM)
        handed_out = phases_of(handle)
        assert handed_out is not None and list(handed_out.as_dict()) == []
        assert time.monotonic() - handle.greeted_at < HELLO_FRESH_S
        # One that waited longer is greeted again (its clock set anew).
        before = handle.greeted_at
        await handle.greet(record.id, unless_within_s=0.0)
        assert handle.greeted_at > before
        assert list(handle.phases.as_dict()) == ["hand-out hello"]
        # The warm-up exec left no entry the user can read, and no process behind.
        assert await manager.exec_log(record.id) == []
        result = await manager.exec(record.id, ExecSpec(["sh", "-c", PROCESSES]))
        assert result.exit_code == 0, result.stderr
        leftovers = [line for line in result.stdout.decode().splitlines() if line.strip()]
        assert leftovers == [], leftovers
        log = await manager.exec_log(record.id)
        assert len(log) == 1 and log[0].command[0] == "sh"
        await manager.kill(record.id)


async def test_a_template_clone_has_no_kernel_image_and_no_huge_pages(settings: Settings) -> None:
    if settings.vmm != "qemu":
        pytest.skip("QEMU's command line and process")
    async with SandboxManager(settings.model_copy(update={"templates": True})) as manager:
        record = await manager.create()
        argv = qemu_argv(record.vmm_pid)
        assert "-incoming" in argv  # really a clone of the template
        assert "-kernel" not in argv and "linuxboot_dma.bin" in argv
        assert thp_enabled(record.vmm_pid) in {"0", "?"}
        # The flag is set around the spawn only: this process keeps its huge pages.
        assert ctypes.CDLL(None).prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0) == 0
        phases = phases_of(manager._core.live[record.id])
        assert phases is not None
        assert {"disk overlay", "QEMU spawn", "QMP connect", "migrate-incoming"} <= set(
            phases.as_dict()
        )
        # The template read the everyday commands' files: a clone's first ones read no disk.
        vm = manager._core.live[record.id].vm
        reads = await disk_reads(vm)
        for command in (["true"], ["ls", "/"]):
            assert (await manager.exec(record.id, ExecSpec(command))).exit_code == 0
        assert await disk_reads(vm) == reads
        direct = "dd if=/dev/vda of=/dev/null bs=4k count=1 iflag=direct status=none"
        assert (await manager.exec(record.id, ExecSpec(["sh", "-c", direct]))).exit_code == 0
        assert await disk_reads(vm) > reads  # the count counts
        result = await manager.exec(record.id, ExecSpec(["cat", "/proc/cmdline"]))
        assert result.exit_code == 0 and b"panic=-1" in result.stdout  # booted as usual
        # Under TCG, no ASLR in the guest's user space (translated code is found by
        # virtual address): two processes map libc at the same address. KVM keeps it.
        tcg = any("accel=tcg" in arg for arg in argv)
        maps = "cat /proc/sys/kernel/randomize_va_space"
        maps += "; for i in 1 2; do grep -m1 libc /proc/self/maps; done"
        result = await manager.exec(record.id, ExecSpec(["sh", "-c", maps]))
        setting, first, second = result.stdout.decode().splitlines()
        assert setting == ("0" if tcg else "2")
        assert (first == second) == tcg, (first, second)
        await manager.kill(record.id)
