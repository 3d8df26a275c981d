"""The manager across server restarts: re-attaching live VMMs, settling stale rows and
removing orphaned directories and processes."""

from __future__ import annotations

import subprocess

import anyio
import pytest

from emberbox.agent_client.client import ExecSpec
from emberbox.config import Settings
from emberbox.service.sandboxes import orphans
from emberbox.service.sandboxes.reconcile import RESTARTED_DURING_BOOT, VMM_GONE
from emberbox.service.sandboxes.state import SandboxState
from tests.support.fakes_sandbox import FakeVMM, spawn_vmm
from tests.support.sandbox_manager import make_manager, seed_rows, stale_row

pytestmark = pytest.mark.anyio


async def test_close_leaves_sandboxes_running_and_restart_reattaches(
    settings: Settings, procs: list[subprocess.Popen[bytes]]
) -> None:
    """close() detaches without killing; the next start() re-attaches live VMMs."""
    first = FakeVMM(spawn=True)
    first.procs = procs
    async with make_manager(settings, first) as manager:
        record = await manager.create()
    sandbox = first.started[record.id]
    assert sandbox.detached and sandbox.kills == 0 and sandbox.proc is not None
    assert sandbox.proc.poll() is None

    second = FakeVMM()
    async with make_manager(settings, second) as manager:
        assert (await manager.get(record.id)).state is SandboxState.RUNNING
        assert second.attached[record.id].attached_pid == sandbox.pid
        assert (await manager.exec(record.id, ExecSpec(["true"]))).exit_code == 0
    assert (settings.vms_dir / record.id).is_dir()


async def test_restart_settles_dead_and_unfinished_rows(settings: Settings, vmm: FakeVMM) -> None:
    """On start: dead running rows → error, creating → error, stopping → stopped; dirs go."""
    rows = [
        stale_row(settings, "dead", "running", pid=2**22 + 7),
        stale_row(settings, "nopid", "running", pid=None),
        stale_row(settings, "boot", "creating", pid=None),
        stale_row(settings, "halt", "stopping", pid=None),
    ]
    await seed_rows(settings, *rows)
    for row in rows:
        assert row.work_dir is not None
        row.work_dir.mkdir(parents=True)
    async with make_manager(settings, vmm) as manager:
        states = {r.id: (r.state.value, r.error) for r in await manager.list()}
    assert states == {
        "dead": ("error", VMM_GONE),
        "nopid": ("error", VMM_GONE),
        "boot": ("error", RESTARTED_DURING_BOOT),
        "halt": ("stopped", None),
    }
    assert list(settings.vms_dir.iterdir()) == []
    assert vmm.attached == {}


async def test_restart_does_not_trust_a_reused_pid(
    settings: Settings, vmm: FakeVMM, procs: list[subprocess.Popen[bytes]]
) -> None:
    """A live pid whose command line does not name the work dir is not re-attached."""
    stranger = spawn_vmm(settings.vms_dir / "someone-else")
    procs.append(stranger)
    await seed_rows(settings, stale_row(settings, "sb", "running", pid=stranger.pid))
    async with make_manager(settings, vmm) as manager:
        record = await manager.get("sb")
    assert (record.state, record.error) == (SandboxState.ERROR, VMM_GONE)
    assert vmm.attached == {}


async def test_failed_attach_kills_what_remains(
    settings: Settings, vmm: FakeVMM, procs: list[subprocess.Popen[bytes]]
) -> None:
    """If re-attaching fails the VMM is killed, its dir removed and the row is error."""
    work_dir = settings.vms_dir / "sb"
    work_dir.mkdir(parents=True)
    proc = spawn_vmm(work_dir)
    procs.append(proc)
    await seed_rows(settings, stale_row(settings, "sb", "running", pid=proc.pid))
    vmm.attach_fails = True
    async with make_manager(settings, vmm) as manager:
        record = await manager.get("sb")
    assert record.state is SandboxState.ERROR
    assert record.error == "could not re-attach after server restart: agent did not answer"
    assert orphans.read_process(proc.pid) is None  # killed (and reaped: it was our child)
    assert not work_dir.exists()


async def test_orphan_dirs_and_processes_are_removed(
    settings: Settings, vmm: FakeVMM, procs: list[subprocess.Popen[bytes]]
) -> None:
    """On start, dirs and processes under vms_dir that no live row owns are removed/killed."""
    ghost = settings.vms_dir / "ghost"
    ghost.mkdir(parents=True)
    (ghost / "overlay.qcow2").write_bytes(b"x")
    orphan = spawn_vmm(ghost)
    procs.append(orphan)
    bystander = spawn_vmm(settings.data_dir / "elsewhere")  # not under vms_dir: left alone
    procs.append(bystander)
    with anyio.fail_after(5):  # until the interpreter shows its argv
        while not orphans.is_vmm_of(orphan.pid, ghost):  # noqa: ASYNC110 (polls /proc)
            await anyio.sleep(0.01)
    async with make_manager(settings, vmm):
        pass
    assert orphans.read_process(orphan.pid) is None  # killed (and reaped: it was our child)
    assert not ghost.exists()
    assert bystander.poll() is None
