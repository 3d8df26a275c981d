"""Fast start over real VMs: template clones, pause/resume, snapshots and forks, the warm
pool, and what happens with broken or mismatched snapshots."""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from pathlib import Path

import anyio
import pytest

from emberbox import errors
from emberbox.agent_client.spec import ExecSpec
from emberbox.config import Settings
from emberbox.service.sandboxes.manager import SandboxManager
from emberbox.service.sandboxes.state import SandboxState
from emberbox.service.vm.templates import CURRENT

pytestmark = [pytest.mark.vm, pytest.mark.anyio]

# A file in /tmp, and a process (in its own session, so that it outlives the exec) that
# holds a value only in memory and serves it on a unix socket.
SERVER = """
import os, socket
value = os.urandom(8).hex()
s = socket.socket(socket.AF_UNIX)
s.bind('/tmp/mem.sock')
s.listen()
while True:
    c, _ = s.accept()
    c.sendall(value.encode())
    c.close()
"""
START_STATEFUL = (
    "echo kept > /tmp/file && "
    f'setsid python3 -c "{SERVER}" >/dev/null 2>&1 < /dev/null & '
    "while [ ! -S /tmp/mem.sock ]; do sleep 0.05; done"
)
CHECK_STATEFUL = (
    'cat /tmp/file; python3 -c "'
    "import socket; s = socket.socket(socket.AF_UNIX); s.connect('/tmp/mem.sock'); "
    'print(s.recv(100).decode())"'
)


@pytest.fixture
def manager_settings(settings: Settings) -> Settings:
    """Per driver (the conftest's ``vmm``): Firecracker must pass the same flows."""
    return settings.model_copy(update={"max_sandboxes": 12})


def state_file(directory: Path) -> Path:
    """The device-state file of a snapshot directory (QEMU: state, Firecracker: vmstate)."""
    (found,) = [p for p in (directory / "state", directory / "vmstate") if p.exists()]
    return found


def process_gone(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}")


async def run(manager: SandboxManager, sandbox_id: str, cmd: str) -> str:
    result = await manager.exec(sandbox_id, ExecSpec(cmd, timeout_s=60))
    assert result.exit_code == 0, result.stderr
    return result.stdout.decode()


async def test_ten_clones_of_one_template_are_distinct_machines(
    manager_settings: Settings,
) -> None:
    """Every sandbox restored from the same template gets its own RNG state, id and clock."""
    probe = (
        "cat /proc/sys/kernel/random/uuid; "
        "python3 -c 'import os; print(os.urandom(16).hex())'; "
        "date +%s; hostname; cat /run/emberbox/sandbox-id"
    )
    seen_uuid, seen_random = set(), set()
    async with SandboxManager(manager_settings) as manager:
        for _ in range(10):
            record = await manager.create()
            lines = (await run(manager, record.id, probe)).split()
            uuid, random_hex, clock, hostname, sandbox_id = lines
            seen_uuid.add(uuid)
            seen_random.add(random_hex)
            assert abs(int(clock) - time.time()) < 10, "guest clock not reset after restore"
            assert hostname == f"emberbox-{record.id}"
            assert sandbox_id == record.id
            await manager.kill(record.id)
    assert len(seen_uuid) == 10 and len(seen_random) == 10


async def test_pause_and_resume_keep_processes_and_files(manager_settings: Settings) -> None:
    async with SandboxManager(manager_settings) as manager:
        record = await manager.create()
        await run(manager, record.id, START_STATEFUL)
        before = (await run(manager, record.id, CHECK_STATEFUL)).split()
        assert before[0] == "kept" and len(before[1]) == 16
        paused = await manager.pause(record.id)
        assert paused.state is SandboxState.PAUSED and paused.vmm_pid is None
        assert record.vmm_pid is not None and process_gone(record.vmm_pid)
        with pytest.raises(errors.Conflict, match="paused"):
            await manager.exec(record.id, ExecSpec("true"))
        resumed = await manager.resume(record.id)
        assert resumed.state is SandboxState.RUNNING
        assert (await run(manager, record.id, CHECK_STATEFUL)).split() == before
        with pytest.raises(errors.Conflict):
            await manager.resume(record.id)  # running, not paused
        # pause again, then kill while paused: nothing of it stays
        await manager.pause(record.id)
        paused_dir = manager_settings.snapshots_dir / f"paused-{record.id}"
        assert paused_dir.is_dir()
        await manager.kill(record.id)
        assert not paused_dir.exists()
        assert (await manager.get(record.id)).state is SandboxState.STOPPED


async def test_snapshot_fork_and_delete_rules(manager_settings: Settings) -> None:
    async with SandboxManager(manager_settings) as manager:
        origin = await manager.create()
        await run(manager, origin.id, START_STATEFUL)
        before = (await run(manager, origin.id, CHECK_STATEFUL)).split()
        snap = await manager.snapshot(origin.id)
        assert snap.size_bytes > 0 and snap.path.is_dir()
        # the origin keeps running after the snapshot
        await run(manager, origin.id, "echo changed > /tmp/file")
        fork = await manager.create(snapshot_id=snap.id)
        assert fork.snapshot_id == snap.id and fork.image == origin.image
        assert (await run(manager, fork.id, CHECK_STATEFUL)).split() == before
        assert (await run(manager, origin.id, "cat /tmp/file")) == "changed\n"
        # a fork's writes are its own
        await run(manager, fork.id, "echo forked > /tmp/file")
        assert (await run(manager, origin.id, "cat /tmp/file")) == "changed\n"

        with pytest.raises(errors.SnapshotMismatch):
            await manager.create(snapshot_id=snap.id, memory_mib=origin.memory_mib * 2)
        with pytest.raises(errors.NotFound):
            await manager.create(snapshot_id="snap-nope")
        with pytest.raises(errors.Conflict, match=fork.id):
            await manager.delete_snapshot(snap.id)

        await manager.kill(fork.id)
        await manager.kill(origin.id)
        fork_dir = manager_settings.vms_dir / fork.id
        assert not fork_dir.exists()
        await manager.delete_snapshot(snap.id)
        assert not snap.path.exists()
        with pytest.raises(errors.NotFound):
            await manager.get_snapshot(snap.id)


async def test_truncated_snapshot_fails_cleanly_naming_the_file(
    manager_settings: Settings,
) -> None:
    async with SandboxManager(manager_settings) as manager:
        origin = await manager.create()
        snap = await manager.snapshot(origin.id)
        await manager.kill(origin.id)
        state = state_file(snap.path)
        with state.open("r+b") as f:
            f.truncate(state.stat().st_size // 3)
        with pytest.raises(errors.SnapshotCorrupt, match=f"{snap.id}.*'{state.name}'"):
            await manager.create(snapshot_id=snap.id)
        failed = [r for r in await manager.list() if r.snapshot_id == snap.id]
        assert [r.state for r in failed] == [SandboxState.ERROR]
        assert not (manager_settings.vms_dir / failed[0].id).exists()
        await manager.delete_snapshot(snap.id)


async def test_broken_template_falls_back_to_cold_boot_and_is_rebuilt(
    manager_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    # A private template cache, so that breaking it touches no other test.
    settings = manager_settings.model_copy(
        update={
            "cache_dir": manager_settings.data_dir / "cache",
            "images_dir_override": manager_settings.images_dir,
        }
    )
    async with SandboxManager(settings) as manager:
        first = await manager.create()  # builds the template
        await manager.kill(first.id)
        (current,) = settings.templates_dir.glob(f"*/{CURRENT}")
        broken_generation = current.resolve()
        state_file(broken_generation / "snap").write_bytes(b"not a saved VM state")
        caplog.set_level(logging.WARNING)
        second = await manager.create()
        assert (await run(manager, second.id, "echo ok")) == "ok\n"
        assert "booting cold" in caplog.text
        await manager.kill(second.id)
        third = await manager.create()  # a new template generation was built
        assert current.resolve() != broken_generation
        await manager.kill(third.id)


async def test_warm_pool_hands_out_unused_vms_and_refills(manager_settings: Settings) -> None:
    settings = manager_settings.model_copy(update={"pool_size": 1})
    async with SandboxManager(settings) as manager:
        with anyio.fail_after(120):
            while manager.pool_ready() < 1:  # noqa: ASYNC110
                await anyio.sleep(0.1)
        (pooled_dir,) = settings.vms_dir.iterdir()
        record = await manager.create()
        assert record.id == pooled_dir.name  # the pooled VM itself, handed out
        assert (
            await run(manager, record.id, "hostname; cat /run/emberbox/sandbox-id")
        ).split() == [
            f"emberbox-{record.id}",
            record.id,
        ]
        # never used before: no command had run in it
        assert (await run(manager, record.id, "ls /tmp | wc -l")).strip() == "0"
        with anyio.fail_after(120):
            while manager.pool_ready() < 1:  # noqa: ASYNC110
                await anyio.sleep(0.1)
        # a shape the pool does not hold is started normally
        other = await manager.create(memory_mib=settings.default_memory_mib + 128)
        assert manager.pool_ready() == 1
        await manager.kill(other.id)
        await manager.kill(record.id)
    # close() killed the pooled VM: the data_dir fixture checks no QEMU is left


async def test_a_refused_create_kills_the_pooled_vm_it_took(manager_settings: Settings) -> None:
    """The hand-out hello runs beside the admission: when the admission refuses, the
    pooled VM it took is killed (not leaked, not put back) and the pool refills."""
    settings = manager_settings.model_copy(update={"pool_size": 1, "max_sandboxes": 1})
    async with SandboxManager(settings) as manager:
        with anyio.fail_after(120):
            while manager.pool_ready() < 1:  # noqa: ASYNC110
                await anyio.sleep(0.1)
        first = await manager.create()
        with anyio.fail_after(120):
            while manager.pool_ready() < 1:  # noqa: ASYNC110
                await anyio.sleep(0.1)
        (taken,) = [d for d in settings.vms_dir.iterdir() if d.name != first.id]
        with pytest.raises(errors.QuotaExceeded):
            await manager.create()
        assert not taken.exists()
        assert taken.name not in {r.id for r in await manager.list()}
        with anyio.fail_after(120):
            while manager.pool_ready() < 1:  # noqa: ASYNC110
                await anyio.sleep(0.1)
        assert (await run(manager, first.id, "echo ok")) == "ok\n"
        await manager.kill(first.id)


async def test_snapshot_of_another_image_build_or_vmm_is_refused(
    manager_settings: Settings,
) -> None:
    """409 before any VM starts: the image was rebuilt since, or another QEMU wrote it."""
    async with SandboxManager(manager_settings) as manager:
        origin = await manager.create()
        snap = await manager.snapshot(origin.id)
        await manager.kill(origin.id)
        for column, value in (("image_hash", "0" * 64), ("vmm_version", "1.0.0")):
            with sqlite3.connect(manager_settings.db_path) as db:
                db.execute(f"UPDATE snapshots SET {column} = ? WHERE id = ?", (value, snap.id))
            with pytest.raises(errors.SnapshotMismatch):
                await manager.create(snapshot_id=snap.id)
            with sqlite3.connect(manager_settings.db_path) as db:
                db.execute(
                    f"UPDATE snapshots SET {column} = ? WHERE id = ?",
                    (getattr(snap, column), snap.id),
                )
        assert [r.state for r in await manager.list() if r.snapshot_id == snap.id] == [
            SandboxState.ERROR
        ]
        await manager.delete_snapshot(snap.id)
