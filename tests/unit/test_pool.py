"""The warm pool's bookkeeping, with a filler that makes plain objects (no VMs)."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from emberbox import errors
from emberbox.config import Settings
from emberbox.service.vm.pool import PoolShape, WarmPool
from tests.support.fakes_sandbox import Thing

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def settings(tmp_path: Path, **kw: object) -> Settings:
    return Settings(data_dir=tmp_path, cache_dir=tmp_path, **kw)  # type: ignore[arg-type]


async def wait_ready(pool: WarmPool[Thing], n: int) -> None:
    with anyio.fail_after(5):
        while pool.ready_count() < n:  # noqa: ASYNC110
            await anyio.sleep(0.01)


async def test_fills_hands_out_refills_and_kills_on_close(tmp_path: Path) -> None:
    made: list[Thing] = []

    async def fill(shape: PoolShape, sandbox_id: str) -> Thing:
        made.append(Thing(sandbox_id))
        return made[-1]

    pool = WarmPool(settings(tmp_path, pool_size=2), fill)
    async with anyio.create_task_group() as tg:
        await tg.start(pool.run)
        await wait_ready(pool, 2)
        assert len(made) == 2 and len({t.id for t in made}) == 2
        other = PoolShape("default", 1, pool.shape.memory_mib + 1)
        assert pool.take(other) is None  # another shape is never pooled
        first = pool.take(pool.shape)
        assert first is made[0]
        await wait_ready(pool, 2)  # refilled
        assert len(made) == 3
        tg.cancel_scope.cancel()
    await pool.close()
    assert [t.killed for t in made] == [False, True, True]  # handed-out one is not ours
    assert pool.ready_count() == 0


async def test_memory_budget_caps_the_pool(tmp_path: Path) -> None:
    async def fill(shape: PoolShape, sandbox_id: str) -> Thing:
        return Thing(sandbox_id)

    pool = WarmPool(
        settings(tmp_path, pool_size=8, default_memory_mib=512, pool_memory_budget_mib=1100), fill
    )
    assert pool.size == 2
    empty = WarmPool(settings(tmp_path, pool_size=0), fill)
    assert empty.size == 0 and empty.take(empty.shape) is None


async def test_a_failing_filler_is_retried_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("emberbox.service.vm.pool.RETRY_AFTER_FAILURE_S", 0.01)
    calls = 0

    async def fill(shape: PoolShape, sandbox_id: str) -> Thing:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise errors.BootTimeout("no handshake")
        return Thing(sandbox_id)

    pool = WarmPool(settings(tmp_path, pool_size=1), fill)
    async with anyio.create_task_group() as tg:
        await tg.start(pool.run)
        await wait_ready(pool, 1)
        tg.cancel_scope.cancel()
    await pool.close()
    assert calls == 3


async def test_a_refill_waits_for_the_hand_out_delay(tmp_path: Path) -> None:
    """The replacement is not started while the sandbox just handed out has its first
    calls (a restore would share the CPU with them)."""
    made: list[Thing] = []

    async def fill(shape: PoolShape, sandbox_id: str) -> Thing:
        made.append(Thing(sandbox_id))
        return made[-1]

    pool = WarmPool(settings(tmp_path, pool_size=1), fill, refill_delay_s=3600)
    async with anyio.create_task_group() as tg:
        await tg.start(pool.run)
        await wait_ready(pool, 1)  # the first fill does not wait: nothing was taken
        assert pool.take(pool.shape) is made[0]
        for _ in range(20):
            await anyio.sleep(0.005)
        assert len(made) == 1 and pool.ready_count() == 0
        tg.cancel_scope.cancel()
    await pool.close()
