"""The warm pool: sandboxes restored ahead of time and handed out by ``create``.

Only the default shape (``default_image``, ``default_vcpus``, ``default_memory_mib``) is
pooled. A pooled VM has been restored from the template, greeted once and has run our
own ``true`` (so the exec path is translated and warm); it has never run a caller's
command, so handing it out cannot leak anything between users. At hand-out the manager
greets it again (fresh entropy, clock, id), while it admits the create, if it waited in
the pool longer than ``HELLO_FRESH_S``; refilling starts ``REFILL_DELAY_S`` later,
so that the new sandbox's first calls do not share the CPU with a restore. The pool
holds at most ``pool_size`` VMs and at most ``pool_memory_budget_mib`` of guest memory.

Pooled VMs have no row in SQLite; a server that dies leaves them to the orphan sweep of
the next start, and :meth:`WarmPool.close` kills them at a clean shutdown.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import anyio
from anyio.abc import TaskStatus

from emberbox import errors
from emberbox.config import Settings
from emberbox.service import metrics

log = logging.getLogger(__name__)

RETRY_AFTER_FAILURE_S = 10.0
# How long a refill waits after a hand-out. A restore is CPU-heavy (QEMU's start, the
# guest's first translated code under TCG), and a caller's first commands usually
# follow its create within this time: they would otherwise share two cores with it
# (pool create -> first exec 52 -> 310 ms on a loaded host, the refill's doing).
REFILL_DELAY_S = 0.3
# A pooled VM handed out within this time of its restore hello is not greeted again: that
# hello's entropy, hostname, id and clock still stand (the guest's clock runs on the
# host's; NTP slews it by at most 0.5 ms/s). An idle VM's hello costs ~5 ms at hand-out
# (the guest wakes up), a quarter of a create -> first exec from the pool.
HELLO_FRESH_S = 60.0


@dataclass(frozen=True)
class PoolShape:
    image: str
    vcpus: int
    memory_mib: int


class Pooled(Protocol):
    """What the pool keeps: anything with an id that can be killed."""

    @property
    def id(self) -> str: ...

    async def kill(self) -> None: ...


P = TypeVar("P", bound=Pooled)


class WarmPool(Generic[P]):
    """``fill(shape, id)`` makes one pooled sandbox (restored from the template)."""

    def __init__(
        self,
        settings: Settings,
        fill: Callable[[PoolShape, str], Awaitable[P]],
        id_bytes: int = 6,
        refill_delay_s: float = REFILL_DELAY_S,
    ) -> None:
        self.shape = PoolShape(
            settings.default_image, settings.default_vcpus, settings.default_memory_mib
        )
        budget = settings.pool_memory_budget_mib // max(1, self.shape.memory_mib)
        self.size = min(settings.pool_size, budget)
        self._fill = fill
        self._id_bytes = id_bytes
        self._ready: list[P] = []
        self._wake = anyio.Event()
        self._closed = False
        self._refill_delay_s = refill_delay_s
        self._taken_at = -math.inf  # monotonic time of the last hand-out

    def ready_count(self, image: str | None = None) -> int:
        if image is not None and image != self.shape.image:
            return 0
        return len(self._ready)

    def take(self, shape: PoolShape, *, refill: bool = True) -> P | None:
        """A ready sandbox of ``shape``, or None. ``refill=False`` leaves starting its
        replacement to the caller (:meth:`refill`), once the hand-out is done: starting
        a VM holds the event loop for tens of milliseconds, which the hand-out would
        otherwise wait behind."""
        if shape != self.shape or not self._ready:
            return None
        sandbox = self._ready.pop(0)
        self._taken_at = time.monotonic()
        if refill:
            self._wake.set()
        return sandbox

    def refill(self) -> None:
        """Start replacing what was taken (no-op when the pool is full)."""
        self._wake.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep the pool full until cancelled (run in the manager's task group)."""
        task_status.started()
        if self.size == 0:
            return
        while not self._closed:
            if len(self._ready) >= self.size:
                self._wake = anyio.Event()
                await self._wake.wait()
                continue
            # Give the sandbox just handed out its first calls to itself.
            await anyio.sleep(max(0.0, self._taken_at + self._refill_delay_s - time.monotonic()))
            sandbox_id = secrets.token_hex(self._id_bytes)
            try:
                sandbox = await self._fill(self.shape, sandbox_id)
            except errors.EmberboxError as exc:
                metrics.POOL_REFILLS.labels("error").inc()
                log.warning("warm pool: could not prepare a sandbox: %s", exc.message)
                await anyio.sleep(RETRY_AFTER_FAILURE_S)
                continue
            if self._closed:
                with anyio.CancelScope(shield=True):
                    await sandbox.kill()
                return
            metrics.POOL_REFILLS.labels("ok").inc()
            self._ready.append(sandbox)

    async def close(self) -> None:
        """Kill every pooled VM. Call shielded, after cancelling :meth:`run`."""
        self._closed = True
        self._wake.set()
        ready, self._ready = self._ready, []
        for sandbox in ready:
            try:
                await sandbox.kill()
            except Exception:
                log.exception("warm pool: killing %s failed", sandbox.id)
