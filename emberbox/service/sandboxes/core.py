"""What every flow of the sandbox manager shares: the store, the live handle of each
running sandbox, the per-sandbox locks, the boots in progress, and the one way a
sandbox's state changes (:meth:`ManagerCore.move`).

:class:`~emberbox.service.sandboxes.manager.SandboxManager` owns one :class:`ManagerCore`;
its boot (:mod:`~emberbox.service.sandboxes.booting`), exec
(:mod:`~emberbox.service.sandboxes.execs`) and snapshot
(:mod:`~emberbox.service.snapshots.operations`) flows work through it.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from typing import Unpack

import anyio
import anyio.to_thread

from emberbox import errors
from emberbox.config import Settings
from emberbox.service.sandboxes import orphans
from emberbox.service.sandboxes.handles import SandboxHandle, SandboxRecord
from emberbox.service.sandboxes.state import SandboxState, check_transition
from emberbox.service.snapshots import records as snapshots
from emberbox.store import SandboxFields, SandboxRow, Store

log = logging.getLogger(__name__)

ID_BYTES = 6  # 12 hex characters: short enough for unix socket paths under vms_dir


class Phase(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


@dataclass
class Boot:
    """A boot in progress, so that kill() and close() can interrupt it."""

    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    done: anyio.Event = field(default_factory=anyio.Event)
    interrupted: bool = False
    error: str | None = None  # None when interrupted by kill(): the row ends ``stopped``

    def interrupt(self, error: str | None) -> None:
        if not self.interrupted:
            self.interrupted, self.error = True, error
        self.scope.cancel()


class ManagerCore:
    """The manager's state. Every state change goes through :meth:`move`, under the
    sandbox's :meth:`lock` (execs take none: the agent multiplexes them)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.phase = Phase.NEW
        self.store: Store | None = None
        self.live: dict[str, SandboxHandle] = {}
        self.locks: dict[str, anyio.Lock] = {}
        self.boots: dict[str, Boot] = {}
        self.admission = anyio.Lock()  # makes "count live, then insert" atomic
        # Guest addresses held by VMs that have no sandbox row (image builders): the
        # allocator skips them as it skips live rows'. Changed under ``admission``.
        self.reserved_addresses: set[str] = set()

    def open_store(self) -> Store:
        """The store, for a public call: refused unless the manager is open."""
        if self.phase is not Phase.OPEN:
            raise errors.Conflict(f"sandbox manager is {self.phase.value}; call start() first")
        return self.db()

    def db(self) -> Store:
        """The store, for internal work (which may still run while close() waits)."""
        if self.store is None or self.store.closed:
            raise errors.Conflict("sandbox manager has no open store")
        return self.store

    async def row(self, sandbox_id: str) -> SandboxRow:
        row = await self.db().get(sandbox_id)
        if row is None:
            raise errors.NotFound(f"no sandbox {sandbox_id}", sandbox_id=sandbox_id)
        return row

    def lock(self, sandbox_id: str) -> anyio.Lock:
        return self.locks.setdefault(sandbox_id, anyio.Lock())

    async def move(
        self,
        sandbox_id: str,
        src: SandboxState,
        dst: SandboxState,
        **fields: Unpack[SandboxFields],
    ) -> SandboxRecord:
        """The one way state changes: legal per the state machine, and a CAS in SQLite."""
        check_transition(src, dst, sandbox_id=sandbox_id)
        row = await self.db().transition(sandbox_id, {src}, dst, **fields)
        return SandboxRecord.from_row(row)

    async def running(self, sandbox_id: str) -> tuple[SandboxRow, SandboxHandle]:
        row = await self.row(sandbox_id)
        handle = self.live.get(sandbox_id)
        if row.state != SandboxState.RUNNING or handle is None:
            raise not_running(sandbox_id, row.state)
        return row, handle

    async def teardown(self, row: SandboxRow, handle: SandboxHandle | None) -> None:
        """End the VMM and remove the work dir. Without a handle (a failed boot, a
        crashed VMM) or when ``handle.kill()`` fails, find leftovers through ``/proc``."""
        work_dir = row.work_dir or self.settings.vms_dir / row.id
        vms_dir = self.settings.vms_dir
        if row.paused_dir is not None:
            await anyio.to_thread.run_sync(snapshots.remove_tree, row.paused_dir)
        try:
            if handle is not None:
                await handle.kill()
        except BaseException:
            await anyio.to_thread.run_sync(orphans.purge, work_dir, vms_dir, None)
            raise
        if handle is None:
            await anyio.to_thread.run_sync(orphans.purge, work_dir, vms_dir, None)
        else:
            await anyio.to_thread.run_sync(orphans.remove_dir, work_dir, vms_dir)

    async def stop_locked(self, sandbox_id: str) -> None:
        """Stop a sandbox (lock held): ``stopping``, teardown, ``stopped`` (or ``error``)."""
        row = await self.row(sandbox_id)
        if row.state == SandboxState.STOPPED:
            return
        if row.state != SandboxState.STOPPING:
            await self.move(sandbox_id, SandboxState(row.state), SandboxState.STOPPING)
        try:
            await self.teardown(row, self.live.pop(sandbox_id, None))
        except Exception as exc:
            await self.move(
                sandbox_id, SandboxState.STOPPING, SandboxState.ERROR, error=f"kill failed: {exc}"
            )
            raise
        await self.move(sandbox_id, SandboxState.STOPPING, SandboxState.STOPPED)
        self.locks.pop(sandbox_id, None)

    async def mark_failed_locked(self, sandbox_id: str, reason: str) -> None:
        """Tear down a running sandbox whose VMM failed and record it ``error`` (lock held)."""
        row = await self.row(sandbox_id)
        if row.state != SandboxState.RUNNING:
            return
        try:
            await self.teardown(row, self.live.pop(sandbox_id, None))
        except Exception:
            log.exception("sandbox %s: cleaning up after a VMM failure", sandbox_id)
        await self.move(sandbox_id, SandboxState.RUNNING, SandboxState.ERROR, error=reason)

    async def abandon_boots(self, wait_s: float) -> None:
        """Interrupt every boot in progress and wait up to ``wait_s`` for each to settle."""
        for boot in list(self.boots.values()):
            boot.interrupt("server shut down during boot")
        with anyio.move_on_after(wait_s):
            for boot in list(self.boots.values()):
                await boot.done.wait()

    async def detach_all(self) -> None:
        """Close every live sandbox's agent connection; the VMs keep running."""
        live, self.live = self.live, {}
        for sandbox_id, handle in live.items():
            try:
                await handle.detach()
            except Exception:
                log.exception("sandbox %s: detaching failed", sandbox_id)


def not_running(sandbox_id: str, state: str, hint: str = "") -> errors.Conflict:
    message = f"sandbox {sandbox_id} is {state}" + (f"; {hint}" if hint else "")
    return errors.Conflict(message, sandbox_id=sandbox_id, state=state)
