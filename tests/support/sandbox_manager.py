"""The real :class:`SandboxManager` over the stand-ins of :mod:`tests.support.fakes_sandbox`
(no VMs), the rows an earlier server left in its database, and waiting for a state."""

from __future__ import annotations

from datetime import timedelta

import anyio

from emberbox.config import Settings
from emberbox.service.sandboxes.manager import SandboxManager
from emberbox.service.sandboxes.state import SandboxState
from emberbox.store import SandboxRow, Store, utcnow
from tests.support.fakes_sandbox import FakeImages, FakeVMM


def make_manager(settings: Settings, vmm: FakeVMM) -> SandboxManager:
    """A manager (not started) whose sandboxes ``vmm`` starts and re-attaches."""
    return SandboxManager(
        settings,
        sandbox_factory=vmm.start,
        sandbox_attacher=vmm.attach,
        image_registry=FakeImages(),
    )


async def seed_rows(settings: Settings, *rows: SandboxRow) -> None:
    """Write rows as an earlier server would have left them."""
    async with await Store.open(settings.db_path) as store:
        for row in rows:
            await store.insert(row)


def stale_row(settings: Settings, sandbox_id: str, state: str, pid: int | None) -> SandboxRow:
    """A row of ``state`` owning ``vms_dir/<id>`` and ``pid``, as a crashed server left it."""
    now = utcnow()
    return SandboxRow(
        id=sandbox_id,
        state=state,
        image="default",
        vcpus=1,
        memory_mib=256,
        timeout_s=60,
        created_at=now,
        expires_at=now + timedelta(seconds=60),
        updated_at=now,
        vmm_pid=pid,
        work_dir=settings.vms_dir / sandbox_id,
    )


async def wait_for_state(
    manager: SandboxManager, sandbox_id: str, state: SandboxState, within_s: float = 5.0
) -> None:
    """Polls the manager until the sandbox is in ``state``; fails after ``within_s``."""
    with anyio.fail_after(within_s):
        while (await manager.get(sandbox_id)).state is not state:  # noqa: ASYNC110 (polls the db)
            await anyio.sleep(0.02)
