"""The spare VMMs' bookkeeping, with a driver whose prelaunched VMs are plain objects."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from emberbox.service.vm.spares import SpareShape, SpareVMMs
from emberbox.vmm.base import BootFiles, SnapshotFiles, VMConfig

pytestmark = pytest.mark.anyio

SHAPE = SpareShape("default", 1, 512)
TEMPLATE = SnapshotFiles(Path("/t/1/snap"), "qemu", "7.2+m2", Path("/t/1/memory"))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeVM:
    def __init__(self, config: VMConfig) -> None:
        self.config = config
        self.running = True
        self.killed = False

    def is_running(self) -> bool:
        return self.running and not self.killed

    async def kill(self) -> None:
        self.killed = True


class Prelauncher:
    """Has ``prelaunch``, so it counts as a Prelaunching driver."""

    name = "fake"

    def __init__(self) -> None:
        self.made: list[FakeVM] = []

    def version(self) -> str:
        return "1"

    def snapshot_key(self) -> str:
        return "fake-1"

    async def start(self, config: VMConfig) -> Any:
        raise NotImplementedError

    async def attach(self, config: VMConfig, pid: int) -> Any:
        raise NotImplementedError

    async def restore(self, config: VMConfig, snapshot: SnapshotFiles, **kw: Any) -> Any:
        raise NotImplementedError

    async def prelaunch(self, config: VMConfig, snapshot: SnapshotFiles, **kw: Any) -> FakeVM:
        self.made.append(FakeVM(config))
        return self.made[-1]


class PlainDriver:
    """No ``prelaunch``: a driver that cannot start a VMM ahead (Firecracker)."""

    name = "plain"

    def version(self) -> str:
        return "1"

    def snapshot_key(self) -> str:
        return "plain-1"

    async def start(self, config: VMConfig) -> Any:
        raise NotImplementedError

    async def attach(self, config: VMConfig, pid: int) -> Any:
        raise NotImplementedError

    async def restore(self, config: VMConfig, snapshot: SnapshotFiles, **kw: Any) -> Any:
        raise NotImplementedError


def config_for(sandbox_id: str) -> VMConfig:
    files = BootFiles(Path("k"), Path("v"), Path("i"), Path("r"))
    return VMConfig(sandbox_id, Path("/vms") / sandbox_id, files, 1, 512)


async def until(check: Callable[[], object], timeout_s: float = 30.0) -> None:
    """Until ``check()`` holds (fills and kills are tasks: on a loaded host they may
    take a while); the assertion after it says whether it did."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check() and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.001)


async def until_ready(spares: SpareVMMs, timeout_s: float = 30.0) -> None:
    await until(spares.ready_count, timeout_s)


async def filled(spares: SpareVMMs, driver: Prelauncher, template: SnapshotFiles = TEMPLATE) -> str:
    spares.claim(SHAPE)  # a create asked for the shape
    spares.refill(driver, template, SHAPE, config_for)
    await until_ready(spares)
    claimed = spares.claim(SHAPE)
    assert claimed is not None
    return claimed


async def test_claim_take_refill_and_close() -> None:
    driver = Prelauncher()
    spares = SpareVMMs(refill_delay_s=0)
    assert spares.claim(SHAPE, want=False) is None  # none before a restore of the shape
    spares.refill(driver, TEMPLATE, SHAPE, config_for)  # only the pool asked: no spare
    await asyncio.sleep(0.01)
    assert not driver.made
    sandbox_id = await filled(spares, driver)
    assert len(sandbox_id) == 12 and driver.made[0].config.vm_id == sandbox_id
    assert spares.claim(SHAPE) is None  # one spare per shape, claimed once
    assert await spares.take("someone-else", TEMPLATE) is None
    taken: object = await spares.take(sandbox_id, TEMPLATE)
    assert taken is driver.made[0]
    assert await spares.take(sandbox_id, TEMPLATE) is None  # taken once
    second = await filled(spares, driver)
    assert second != sandbox_id
    spares.refill(driver, TEMPLATE, SHAPE, config_for)  # a third, ready but unclaimed
    await until_ready(spares)
    await spares.close()
    # The taken one is the sandbox's now; the claimed and the ready one were ours.
    assert [vm.killed for vm in driver.made] == [False, True, True]
    spares.refill(driver, TEMPLATE, SHAPE, config_for)  # closed: makes nothing
    await asyncio.sleep(0.01)
    assert len(driver.made) == 3


async def test_a_released_claim_or_a_replaced_template_kills_the_spare() -> None:
    driver = Prelauncher()
    spares = SpareVMMs(refill_delay_s=0)
    first = await filled(spares, driver)
    spares.release(first)  # its create failed at admission
    newer = SnapshotFiles(Path("/t/2/snap"), "qemu", "7.2+m2", Path("/t/2/memory"))
    second = await filled(spares, driver)
    assert await spares.take(second, newer) is None  # made for the old template
    await until(lambda: all(vm.killed for vm in driver.made))
    assert [vm.killed for vm in driver.made] == [True, True]
    await spares.close()


async def test_a_spare_whose_vmm_exited_is_not_used() -> None:
    driver = Prelauncher()
    spares = SpareVMMs(refill_delay_s=0)
    spares.claim(SHAPE)
    spares.refill(driver, TEMPLATE, SHAPE, config_for)
    await until_ready(spares)
    driver.made[0].running = False
    assert spares.claim(SHAPE) is None
    sandbox_id = await filled(spares, driver)
    driver.made[1].running = False  # exits between the claim and the restore
    assert await spares.take(sandbox_id, TEMPLATE) is None
    await spares.close()


async def test_no_spares_from_a_driver_that_cannot_prelaunch_or_past_the_cap() -> None:
    spares = SpareVMMs(refill_delay_s=0, max_spares=1)
    other = SpareShape("other", 1, 512)
    spares.claim(SHAPE)
    spares.claim(other)
    spares.refill(PlainDriver(), TEMPLATE, SHAPE, config_for)
    await asyncio.sleep(0.01)
    assert spares.ready_count() == 0
    driver = Prelauncher()
    spares.refill(driver, TEMPLATE, SHAPE, config_for)
    spares.refill(driver, TEMPLATE, other, config_for)  # past the cap
    await until_ready(spares)
    await asyncio.sleep(0.01)
    assert spares.ready_count() == 1 and len(driver.made) == 1
    await spares.close()
    assert driver.made[0].killed


async def test_dropping_an_image_kills_its_spares_only() -> None:
    """A deleted image's spares go (they map its template); another image's stay."""
    driver = Prelauncher()
    spares = SpareVMMs(refill_delay_s=0)
    other = SpareShape("other", 1, 512)
    for shape in (SHAPE, other):
        spares.claim(shape)  # a create asked for each shape
        spares.refill(driver, TEMPLATE, shape, config_for)
    await until(lambda: spares.ready_count() == 2)
    assert spares.ready_count() == 2
    await spares.drop("default")
    assert spares.ready_count() == 1
    by_image = {vm.config.vm_id: vm for vm in driver.made}
    assert sorted(vm.killed for vm in by_image.values()) == [False, True]
    kept = spares.claim(other)
    assert kept is not None and not by_image[kept].killed
    assert spares.claim(SHAPE) is None
    await spares.close()


async def test_a_made_spare_no_longer_counts_as_being_made() -> None:
    """Once its spare is ready, a fill no longer holds its shape: a refill right after a
    claim makes the next spare (it used to wait for the fill task's done-callback, so
    a refill that came first made none)."""
    driver = Prelauncher()
    spares = SpareVMMs(refill_delay_s=0)
    spares.claim(SHAPE)
    spares.refill(driver, TEMPLATE, SHAPE, config_for)
    while not spares.ready_count():  # noqa: ASYNC110 (each turn of the loop counts here)
        await asyncio.sleep(0)
    assert spares.claim(SHAPE) is not None
    spares.refill(driver, TEMPLATE, SHAPE, config_for)
    await until_ready(spares, timeout_s=2.0)
    assert spares.ready_count() == 1 and len(driver.made) == 2
    await spares.close()
