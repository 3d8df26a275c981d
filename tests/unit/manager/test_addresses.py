"""Guest addresses held by VMs without a sandbox row (image builders) are never given
to a sandbox admitted meanwhile, nor to another builder."""

from __future__ import annotations

import pytest

from emberbox.config import Settings
from emberbox.service.sandboxes.booting import allocate_address
from emberbox.service.sandboxes.manager import SandboxManager

pytestmark = pytest.mark.anyio


async def test_a_reserved_address_is_skipped_until_released(
    manager: SandboxManager, settings: Settings
) -> None:
    core = manager._core
    async with manager.reserve_address() as first, manager.reserve_address() as second:
        assert first != second
        # What sandbox admission asks for while both builders run.
        admitted = await allocate_address(settings, core.db(), core.reserved_addresses)
        assert admitted not in {first, second}
    assert core.reserved_addresses == set()
    assert await allocate_address(settings, core.db(), core.reserved_addresses) == first


async def test_a_failed_block_releases_its_address(manager: SandboxManager) -> None:
    with pytest.raises(RuntimeError):
        async with manager.reserve_address():
            raise RuntimeError("builder died")
    assert manager._core.reserved_addresses == set()
