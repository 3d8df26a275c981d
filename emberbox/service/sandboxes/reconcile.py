"""After a server restart: make the database and the host agree again.

For every row left in ``creating``, ``running`` or ``stopping``:

* ``running`` whose VMM is still alive (its pid's command line names the row's work
  directory) → re-attached; if attaching fails, or the VMM is gone → whatever remains
  is killed and removed and the row goes to ``error`` with the reason;
* ``creating`` → nothing half-booted survives: cleaned up, ``error`` ("server restarted
  during boot");
* ``stopping`` → the kill the user asked for is finished: cleaned up, ``stopped``.

Then every process naming an entry of ``vms_dir`` and every directory of ``vms_dir``
that no re-attached sandbox owns is an orphan: killed / removed.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import anyio
import anyio.to_thread

from emberbox.config import Settings
from emberbox.service import metrics
from emberbox.service.sandboxes import orphans
from emberbox.service.sandboxes.state import UNSETTLED_STATES, SandboxState, check_transition
from emberbox.store import SandboxRow, Store

log = logging.getLogger(__name__)

H = TypeVar("H")

VMM_GONE = "VMM gone after server restart"
RESTARTED_DURING_BOOT = "server restarted during boot"
MAX_PARALLEL_ATTACHES = 8


@dataclass
class ReconcileReport(Generic[H]):
    """What reconciliation found: the re-attached handles and what it ended."""

    attached: dict[str, H] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # sandbox id -> reason
    stopped: list[str] = field(default_factory=list)
    swept: orphans.SweepReport = field(default_factory=orphans.SweepReport)


def work_dir_of(settings: Settings, row: SandboxRow) -> Path:
    return row.work_dir or settings.vms_dir / row.id


async def reconcile(
    settings: Settings, store: Store, attach: Callable[[SandboxRow], Awaitable[H]]
) -> ReconcileReport[H]:
    """Re-attach what survived, settle every other unsettled row, sweep orphans."""
    report: ReconcileReport[H] = ReconcileReport()
    rows = await store.list(states=UNSETTLED_STATES)
    limiter = anyio.CapacityLimiter(MAX_PARALLEL_ATTACHES)

    async def settle(row: SandboxRow) -> None:
        async with limiter:
            await _settle(settings, store, row, attach, report)

    async with anyio.create_task_group() as tg:
        for row in rows:
            tg.start_soon(settle, row)
    report.swept = await anyio.to_thread.run_sync(
        orphans.sweep, settings.vms_dir, frozenset(report.attached)
    )
    removed = len(report.swept.killed_pids) + len(report.swept.removed_dirs)
    if removed:
        metrics.REAPER_ACTIONS.labels("orphan_removed").inc(removed)
    return report


async def _settle(
    settings: Settings,
    store: Store,
    row: SandboxRow,
    attach: Callable[[SandboxRow], Awaitable[H]],
    report: ReconcileReport[H],
) -> None:
    state = SandboxState(row.state)
    if state is SandboxState.CREATING:
        await _abandon(settings, store, row, SandboxState.ERROR, RESTARTED_DURING_BOOT, report)
        return
    if state is SandboxState.STOPPING:
        await _abandon(settings, store, row, SandboxState.STOPPED, None, report)
        return
    work_dir = work_dir_of(settings, row)
    alive = row.vmm_pid is not None and await anyio.to_thread.run_sync(
        orphans.is_vmm_of, row.vmm_pid, work_dir
    )
    if not alive:
        await _abandon(settings, store, row, SandboxState.ERROR, VMM_GONE, report)
        return
    try:
        handle = await attach(row)
    except Exception as exc:
        log.warning("sandbox %s: re-attach failed: %s", row.id, exc)
        reason = f"could not re-attach after server restart: {exc}"
        await _abandon(settings, store, row, SandboxState.ERROR, reason, report)
        return
    report.attached[row.id] = handle
    log.info("sandbox %s re-attached (pid %s)", row.id, row.vmm_pid)


async def _abandon(
    settings: Settings,
    store: Store,
    row: SandboxRow,
    target: SandboxState,
    reason: str | None,
    report: ReconcileReport[H],
) -> None:
    """Kill and remove what is left of ``row`` and move it to ``target``."""
    check_transition(SandboxState(row.state), target, sandbox_id=row.id)
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(
            orphans.purge, work_dir_of(settings, row), settings.vms_dir, row.vmm_pid
        )
        if reason is None:
            await store.transition(row.id, {row.state}, target)
            report.stopped.append(row.id)
        else:
            await store.transition(row.id, {row.state}, target, error=reason)
            report.failed[row.id] = reason
            log.warning("sandbox %s: %s", row.id, reason)
