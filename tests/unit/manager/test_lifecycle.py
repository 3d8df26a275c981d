"""The manager creating, listing, killing and timing out sandboxes (the reaper included)."""

from __future__ import annotations

from datetime import timedelta

import anyio
import pytest

from emberbox import errors
from emberbox.agent_client.client import ExecSpec
from emberbox.config import Settings
from emberbox.service.sandboxes.manager import SandboxManager
from emberbox.service.sandboxes.reaper import VMM_EXITED
from emberbox.service.sandboxes.state import SandboxState
from emberbox.store import Store, utcnow
from tests.support.fakes_sandbox import FakeVMM
from tests.support.sandbox_manager import make_manager, wait_for_state

pytestmark = pytest.mark.anyio


# -- create ---------------------------------------------------------------------------------


async def test_create_boots_detached_and_records_running(
    manager: SandboxManager, vmm: FakeVMM, settings: Settings
) -> None:
    """create() boots a detached sandbox with the defaults and returns it running."""
    record = await manager.create(metadata={"team": "a"}, env={"A": "1"})
    assert record.state is SandboxState.RUNNING
    assert (record.image, record.vcpus, record.memory_mib) == ("default", 1, 512)
    assert record.work_dir == settings.vms_dir / record.id
    assert record.metadata == {"team": "a"} and record.env == {"A": "1"}
    assert record.expires_at > record.created_at
    assert vmm.lifetimes == ["detached"]
    assert await manager.get(record.id) == record


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"vcpus": 0}, "vcpus"),
        ({"vcpus": 3}, "vcpus"),
        ({"vcpus": True}, "vcpus"),
        ({"memory_mib": 63}, "memory_mib"),
        ({"memory_mib": 1025}, "memory_mib"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"timeout_s": 601}, "timeout_s"),
        ({"image": ""}, "image"),
        ({"env": {"A=B": "1"}}, "env"),
        ({"metadata": {"k": 1}}, "metadata"),
    ],
)
async def test_create_rejects_bad_requests_before_booting(
    manager: SandboxManager, vmm: FakeVMM, kwargs: dict[str, object], field: str
) -> None:
    """Out-of-range shape, timeout or malformed env/metadata is InvalidRequest; nothing boots."""
    with pytest.raises(errors.InvalidRequest) as caught:
        await manager.create(**kwargs)  # type: ignore[arg-type]
    assert caught.value.details["field"] == field
    assert vmm.started == {} and await manager.list() == []


async def test_unknown_image_fails_before_booting(manager: SandboxManager, vmm: FakeVMM) -> None:
    """An unknown image raises ImageNotFound naming the available ones; nothing boots."""
    with pytest.raises(errors.ImageNotFound) as caught:
        await manager.create(image="nope")
    assert caught.value.available == ["default", "python"]
    assert vmm.lifetimes == [] and await manager.list() == []


async def test_cap_counts_live_sandboxes(manager: SandboxManager) -> None:
    """The max_sandboxes+1-th live sandbox is refused naming the limit; a kill frees a slot."""
    records = [await manager.create() for _ in range(3)]
    with pytest.raises(errors.QuotaExceeded, match="max_sandboxes=3") as caught:
        await manager.create()
    assert caught.value.details["limit"] == 3
    await manager.kill(records[0].id)
    assert (await manager.create()).state is SandboxState.RUNNING


async def test_boot_failure_records_error_and_leaves_nothing(
    manager: SandboxManager, vmm: FakeVMM, settings: Settings
) -> None:
    """A failed boot re-raises its error, leaves the row in error with the reason, no files."""
    vmm.fail_with = errors.BootTimeout("no handshake within 60s", console_tail="kernel panic")
    with pytest.raises(errors.BootTimeout):
        await manager.create()
    (record,) = await manager.list()
    assert record.state is SandboxState.ERROR
    assert record.error == "boot failed: no handshake within 60s"
    assert not (settings.vms_dir / record.id).exists()
    vmm.fail_with = None
    assert len([await manager.create() for _ in range(3)]) == 3  # error rows are not live


async def test_kill_during_boot_cancels_it(manager: SandboxManager, vmm: FakeVMM) -> None:
    """Killing a creating sandbox cancels its boot; create raises Conflict; row is stopped."""
    vmm.gate = anyio.Event()
    outcome: list[BaseException] = []

    async def create() -> None:
        try:
            await manager.create()
        except errors.Conflict as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(create)
        with anyio.fail_after(5):
            await vmm.booting.wait()
        (record,) = await manager.list(state=SandboxState.CREATING)
        await manager.kill(record.id)
    assert vmm.boot_cancelled
    assert "killed while booting" in str(outcome[0])
    assert (await manager.get(record.id)).state is SandboxState.STOPPED


async def test_cancelled_create_leaves_error_row(manager: SandboxManager, vmm: FakeVMM) -> None:
    """If the caller of create() is cancelled, the boot is cleaned up and the row is error."""
    vmm.gate = anyio.Event()
    with anyio.move_on_after(0.2):
        await manager.create()
    (record,) = await manager.list()
    assert record.state is SandboxState.ERROR
    assert record.error == "creation was cancelled"
    assert vmm.boot_cancelled


async def test_close_during_boot_abandons_it(settings: Settings, vmm: FakeVMM) -> None:
    """Closing the manager mid-boot ends the boot and records the row as error."""
    vmm.gate = anyio.Event()
    manager = make_manager(settings, vmm)
    outcome: list[BaseException] = []

    async def create() -> None:
        try:
            await manager.create()
        except errors.Conflict as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as tg:
        await manager.start()  # start() and close() run in one task, inside this group
        tg.start_soon(create)
        with anyio.fail_after(5):
            await vmm.booting.wait()
        await manager.close()
    assert "server shutting down" in str(outcome[0])
    async with await Store.open(settings.db_path) as store:
        (row,) = await store.list()
    assert (row.state, row.error) == ("error", "server shut down during boot")


# -- queries --------------------------------------------------------------------------------


async def test_get_unknown_is_not_found(manager: SandboxManager) -> None:
    """get(), exec() and kill() of an unknown id raise NotFound."""
    with pytest.raises(errors.NotFound, match="no sandbox ghost"):
        await manager.get("ghost")
    with pytest.raises(errors.NotFound):
        await manager.exec("ghost", ExecSpec(["true"]))
    with pytest.raises(errors.NotFound):
        await manager.kill("ghost")


async def test_list_filters_by_state_and_metadata(manager: SandboxManager) -> None:
    """list() filters by state and by every metadata pair."""
    a = await manager.create(metadata={"team": "a", "tier": "1"})
    b = await manager.create(metadata={"team": "b"})
    await manager.kill(b.id)
    assert [r.id for r in await manager.list()] == [a.id, b.id]
    assert [r.id for r in await manager.list(state=SandboxState.RUNNING)] == [a.id]
    assert [r.id for r in await manager.list(metadata={"team": "b"})] == [b.id]
    assert await manager.list(metadata={"team": "a", "tier": "2"}) == []


async def test_image_names_come_from_the_registry(manager: SandboxManager) -> None:
    """image_names() lists the registry's images."""
    assert await manager.image_names() == ["default", "python"]


async def test_calls_before_start_are_refused(settings: Settings, vmm: FakeVMM) -> None:
    """A manager that was not started refuses work instead of failing obscurely."""
    with pytest.raises(errors.Conflict, match="start"):
        await make_manager(settings, vmm).create()


# -- kill and timeouts ----------------------------------------------------------------------


async def test_kill_is_idempotent_and_concurrency_safe(
    manager: SandboxManager, vmm: FakeVMM, settings: Settings
) -> None:
    """Concurrent and repeated kills end in stopped with the VM killed and its dir gone."""
    record = await manager.create()
    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(manager.kill, record.id)
    await manager.kill(record.id)
    assert (await manager.get(record.id)).state is SandboxState.STOPPED
    assert vmm.started[record.id].kills == 1
    assert not (settings.vms_dir / record.id).exists()


async def test_set_timeout_moves_expiry(manager: SandboxManager) -> None:
    """set_timeout() sets expires_at to now + timeout_s, only on running sandboxes."""
    record = await manager.create(timeout_s=60)
    before = utcnow()
    updated = await manager.set_timeout(record.id, 500)
    assert updated.timeout_s == 500
    assert before + timedelta(seconds=499) < updated.expires_at < utcnow() + timedelta(seconds=501)
    with pytest.raises(errors.InvalidRequest):
        await manager.set_timeout(record.id, 601)
    await manager.kill(record.id)
    with pytest.raises(errors.Conflict, match="is stopped; only a running"):
        await manager.set_timeout(record.id, 10)


async def test_reaper_kills_expired_sandboxes(manager: SandboxManager, vmm: FakeVMM) -> None:
    """A sandbox past its timeout is killed by the reaper and ends stopped."""
    record = await manager.create(timeout_s=1)
    keep = await manager.create(timeout_s=600)
    await wait_for_state(manager, record.id, SandboxState.STOPPED)
    assert vmm.started[record.id].kills == 1
    assert (await manager.get(keep.id)).state is SandboxState.RUNNING


async def test_reaper_marks_crashed_vmm_as_error(
    manager: SandboxManager, vmm: FakeVMM, settings: Settings
) -> None:
    """A VMM that exits on its own is noticed: error 'VMM exited unexpectedly', files gone."""
    record = await manager.create()
    vmm.started[record.id].running = False
    await wait_for_state(manager, record.id, SandboxState.ERROR)
    assert (await manager.get(record.id)).error == VMM_EXITED
    assert not (settings.vms_dir / record.id).exists()
    await manager.kill(record.id)  # cleanup of an error sandbox: error → stopped
    assert (await manager.get(record.id)).state is SandboxState.STOPPED
