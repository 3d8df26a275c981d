"""The reaper: every ``reaper_interval_s`` it kills sandboxes past their ``expires_at``
and marks ``error`` those whose VMM died on its own.

It only decides *what* to end; the manager (a :class:`ReaperHost`) does the ending
under its per-sandbox locks, so a reap never races a user's kill.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

import anyio
from anyio.abc import TaskStatus

from emberbox.service import metrics
from emberbox.store import utcnow

log = logging.getLogger(__name__)

VMM_EXITED = "VMM exited unexpectedly"
MAX_PARALLEL_KILLS = 8


class ReaperHost(Protocol):
    """What the reaper needs from the sandbox manager."""

    async def expired_ids(self, now: datetime) -> Sequence[str]:
        """Running sandboxes whose ``expires_at`` is before ``now``."""
        ...

    def crashed_ids(self) -> Sequence[str]:
        """Sandboxes whose VMM is no longer running although nobody killed them."""
        ...

    async def kill(self, sandbox_id: str) -> None: ...

    async def mark_failed(self, sandbox_id: str, reason: str) -> None:
        """Tear down what remains of a running sandbox and record it as ``error``."""
        ...


@dataclass
class ReapReport:
    expired: list[str] = field(default_factory=list)
    crashed: list[str] = field(default_factory=list)


class Reaper:
    """Periodic clean-up; run :meth:`run` in a task group, cancel it to stop."""

    def __init__(self, host: ReaperHost, interval_s: float) -> None:
        self._host = host
        self.interval_s = interval_s
        self._limiter = anyio.CapacityLimiter(MAX_PARALLEL_KILLS)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await anyio.sleep(self.interval_s)
            try:
                await self.reap_once()
            except Exception:  # one bad sweep must not stop the reaper for good
                log.exception("reaper sweep failed")

    async def reap_once(self, now: datetime | None = None) -> ReapReport:
        """One sweep: kill the expired, fail the crashed. Per-sandbox errors are logged."""
        report = ReapReport(
            crashed=list(self._host.crashed_ids()),
            expired=list(await self._host.expired_ids(now or utcnow())),
        )
        async with anyio.create_task_group() as tg:
            for sandbox_id in report.crashed:
                tg.start_soon(self._fail, sandbox_id)
            for sandbox_id in report.expired:
                if sandbox_id not in report.crashed:
                    tg.start_soon(self._kill, sandbox_id)
        return report

    async def _kill(self, sandbox_id: str) -> None:
        async with self._limiter:
            try:
                await self._host.kill(sandbox_id)
                metrics.REAPER_ACTIONS.labels("expired").inc()
                log.info("sandbox %s reached its timeout and was killed", sandbox_id)
            except Exception:
                log.exception("reaper could not kill expired sandbox %s", sandbox_id)

    async def _fail(self, sandbox_id: str) -> None:
        async with self._limiter:
            try:
                await self._host.mark_failed(sandbox_id, VMM_EXITED)
                metrics.REAPER_ACTIONS.labels("vmm_died").inc()
                log.warning("sandbox %s: %s", sandbox_id, VMM_EXITED)
            except Exception:
                log.exception("reaper could not clean up crashed sandbox %s", sandbox_id)
