"""Spare VMMs over real QEMU: after a template restore its shape gets a QEMU started
ahead (``-incoming defer``); the next create without a network takes its id and only
loads the state into it; a spare whose QEMU died is not used (and the restore in its
place is whole); close kills the spares."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import anyio
import pytest

from emberbox.agent_client.spec import ExecSpec
from emberbox.config import Settings
from emberbox.service.sandboxes.manager import SandboxManager
from emberbox.service.vm.spares import SpareVMMs
from emberbox.vmm.phases import phases_of

pytestmark = [pytest.mark.vm, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def spares_of(manager: SandboxManager) -> SpareVMMs:
    spares = manager._boots._spares
    assert spares is not None
    return spares


async def ready_spare(manager: SandboxManager) -> tuple[str, int]:
    """The id and QEMU pid of the spare of the default shape, once it is there."""
    spares = spares_of(manager)
    with anyio.fail_after(60):
        while spares.ready_count() < 1:  # noqa: ASYNC110
            await anyio.sleep(0.05)
    (spare,) = spares._ready.values()
    assert spare.vm.pid is not None
    return spare.sandbox_id, spare.vm.pid


def cmdline(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def test_a_restore_loads_into_the_spare_made_ahead(settings: Settings) -> None:
    if settings.vmm != "qemu":
        pytest.skip("spares are QEMU's (-incoming defer)")
    config = settings.model_copy(update={"templates": True, "pool_size": 0})
    async with SandboxManager(config) as manager:
        first = await manager.create()  # a restore of its own: the shape has no spare yet
        assert phases_of(manager._core.live[first.id]).as_dict().get("QEMU spawn") is not None  # type: ignore[union-attr]
        await manager.kill(first.id)

        spare_id, pid = await ready_spare(manager)
        argv = cmdline(pid)
        assert b"-incoming" in argv and b"defer" in argv
        # The template's state is loaded into it ahead, and its guest has never run.
        (spare,) = spares_of(manager)._ready.values()
        status = await (await spare.vm.qmp()).execute("query-status")  # type: ignore[attr-defined]
        assert status["running"] is False and status["status"] != "inmigrate", status
        record = await manager.create()
        assert (record.id, record.vmm_pid) == (spare_id, pid)
        handle = manager._core.live[record.id]
        during = phases_of(handle)
        assert during is not None
        assert "resume" in during.as_dict()
        assert not {"QEMU spawn", "migrate-incoming"} & set(during.as_dict())
        ahead = handle.prepared_phases  # type: ignore[attr-defined]
        assert ahead is not None
        assert {"QEMU spawn", "QMP connect", "migrate-incoming"} <= set(ahead.as_dict())
        # A sandbox like any restore: its own name and id, fresh entropy, a working exec.
        result = await manager.exec(
            record.id,
            ExecSpec("hostname; cat /run/emberbox/sandbox-id; head -c8 /dev/urandom | od -An -tx1"),
        )
        assert result.exit_code == 0, result.stderr
        hostname, sandbox_id, _ = result.stdout.decode().splitlines()
        assert hostname == f"emberbox-{record.id[:12]}" and sandbox_id == record.id
        await manager.kill(record.id)
        assert not alive(pid)

        # A spare whose QEMU died in the meantime is not used: a plain restore instead.
        dead_id, dead_pid = await ready_spare(manager)
        os.kill(dead_pid, signal.SIGKILL)
        with anyio.fail_after(10):
            while alive(dead_pid):  # noqa: ASYNC110
                await anyio.sleep(0.02)
        other = await manager.create()  # may keep the dead spare's id: a name, nothing more
        assert other.vmm_pid not in (None, dead_pid)
        assert (await manager.exec(other.id, ExecSpec(["true"]))).exit_code == 0
        await manager.kill(other.id)

        last_id, last_pid = await ready_spare(manager)
    # Closing the manager kills the spare it held, and leaves no directory of it.
    assert not alive(last_pid)
    assert not (config.vms_dir / last_id).exists()
    assert not (config.vms_dir / dead_id).exists()
