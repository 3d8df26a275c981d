"""A warm pool per configured image (``Settings.pool_images``): the manager keeps one
ready and hands it out to a create of that image, then refills it (no VMs: the fake VMM)."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from emberbox.config import Settings
from tests.support.fakes_sandbox import FakeSandbox, FakeVMM
from tests.support.sandbox_manager import make_manager

pytestmark = pytest.mark.anyio


async def test_an_image_pool_hands_out_its_sandbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    greeted: list[str] = []

    async def greet(self: FakeSandbox, sandbox_id: str, *, unless_within_s: float = 0.0) -> object:
        greeted.append(sandbox_id)
        return None

    monkeypatch.setattr(FakeSandbox, "greet", greet)
    settings = Settings(
        data_dir=tmp_path / "data",
        cache_dir=tmp_path / "cache",
        pool_size=0,
        pool_images={"python": 1},
        default_memory_mib=256,
    )
    vmm = FakeVMM()
    async with make_manager(settings, vmm) as manager:
        with anyio.fail_after(5):
            while manager.pool_ready("python") < 1:  # noqa: ASYNC110 (the pool fills itself)
                await anyio.sleep(0.01)
        assert manager.pool_ready("default") == 0
        [pooled_id] = vmm.started
        record = await manager.create(image="python")
        assert (record.image, greeted) == ("python", [record.id])  # handed out, greeted
        with anyio.fail_after(5):
            while manager.pool_ready("python") < 1:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        other = await manager.create(image="default")  # no pool of its own: started
        # Three starts: the pooled one, its refill, and this one; the hand-out none.
        assert other.id != pooled_id and len(vmm.started) == 3
        for sandbox_id in (record.id, other.id):
            await manager.kill(sandbox_id)
