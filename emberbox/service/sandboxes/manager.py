"""The sandbox manager: create, exec in, time out and kill sandboxes; survive restarts.

The manager owns three things: the :class:`~emberbox.store.Store` (the truth about every
sandbox), the live :class:`SandboxHandle` of each running sandbox, and the reaper task.
Every state change goes through :func:`~emberbox.service.sandboxes.state.check_transition` and an
atomic compare-and-set in the store, under a per-sandbox lock so that create, kill and
the reaper never interleave on one sandbox. Execs take no lock: the guest agent
multiplexes any number of them.

Sandboxes are booted ``detached``: :meth:`SandboxManager.close` leaves them running and
the next :meth:`SandboxManager.start` re-attaches them
(:mod:`emberbox.service.sandboxes.reconcile`).
``start`` and ``close`` must run in the same task (``async with manager:`` does).

The shared state is in :mod:`~emberbox.service.sandboxes.core`; the flows in ``booting``, ``execs``
and ``snapshotting``; the Protocols and :class:`SandboxRecord` in ``handles`` (re-exported).
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread
from anyio.abc import TaskGroup

from emberbox import errors
from emberbox.agent_client.answers import ExecResult
from emberbox.agent_client.spec import ExecSpec
from emberbox.config import Settings
from emberbox.service.catalog import image_pool_settings, resolve_ref
from emberbox.service.sandboxes import execs, storage, validation
from emberbox.service.sandboxes.booting import (
    BootFlows,
    HandOut,
    allocate_address,
    network_plan,
)
from emberbox.service.sandboxes.core import ID_BYTES, ManagerCore, Phase
from emberbox.service.sandboxes.handles import (
    ImageCatalog,
    OutputCallback,
    SandboxAttacher,
    SandboxFactory,
    SandboxHandle,
    SandboxRecord,
    SandboxRestorer,
    default_handles,
    default_registry,
)
from emberbox.service.sandboxes.reaper import Reaper
from emberbox.service.sandboxes.reconcile import reconcile
from emberbox.service.sandboxes.state import SandboxState
from emberbox.service.snapshots import records as snapshots
from emberbox.service.snapshots.operations import SnapshotFlows
from emberbox.service.snapshots.records import SnapshotRecord
from emberbox.service.vm.pool import PoolShape, WarmPool
from emberbox.store import (
    LOCAL_TENANT_ID,
    ExecLogEntry,
    SandboxFields,
    SnapshotRow,
    Store,
    utcnow,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

    from emberbox.service.guestio.files import SandboxFiles
    from emberbox.service.guestio.ports import SandboxPorts
    from emberbox.service.guestio.processes import Processes

log = logging.getLogger(__name__)

SHUTDOWN_BOOT_WAIT_S = 30.0


class SandboxManager:
    """Owns every sandbox of one server. Use as ``async with SandboxManager(settings):``."""

    def __init__(
        self,
        settings: Settings,
        *,
        sandbox_factory: SandboxFactory | None = None,
        sandbox_attacher: SandboxAttacher | None = None,
        sandbox_restorer: SandboxRestorer | None = None,
        image_registry: ImageCatalog | None = None,
    ) -> None:
        self._settings = settings
        factory, attacher, restorer = default_handles()
        restorer = sandbox_restorer or restorer
        self._core = ManagerCore(settings)
        self._boots = BootFlows(
            self._core, sandbox_factory or factory, restorer, sandbox_attacher or attacher
        )
        self.pool: WarmPool[SandboxHandle] = WarmPool(settings, self._boots.fill_pool, ID_BYTES)
        self.image_pools: list[WarmPool[SandboxHandle]] = [  # Settings.pool_images
            WarmPool(s, self._boots.fill_pool, ID_BYTES) for s in image_pool_settings(settings)
        ]
        self._images = image_registry or default_registry(settings)
        self._snapshots = SnapshotFlows(self._core, self._boots, restorer, self._images)
        self._stack = contextlib.AsyncExitStack()
        self._task_group: TaskGroup | None = None
        self.reaper = Reaper(self, settings.reaper_interval_s)
        self.processes: Processes
        self.files: SandboxFiles
        self.processes, self.files, self.ports = _guest_services(self, settings)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store, reconcile with what survived a restart, start the reaper."""
        core = self._core
        if core.phase is not Phase.NEW:
            raise errors.Conflict(f"sandbox manager is {core.phase.value}; cannot start")
        core.phase = Phase.OPEN
        try:
            vms_dir = self._settings.vms_dir
            await anyio.to_thread.run_sync(lambda: vms_dir.mkdir(0o700, True, True))
            core.store = await Store.open(self._settings.db_path)
            report = await reconcile(self._settings, core.store, self._boots.attach)
            core.live.update(report.attached)
            self._task_group = await self._stack.enter_async_context(anyio.create_task_group())
            await self._task_group.start(self.reaper.run)
            await self._task_group.start(self.pool.run)
            for pool in self.image_pools:
                await self._task_group.start(pool.run)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop the reaper, detach from running sandboxes (they keep running), close the
        store. Boots in progress are abandoned (``error``). Idempotent."""
        core = self._core
        if core.phase is Phase.CLOSED:
            return
        core.phase = Phase.CLOSED
        if self._task_group is not None:
            self._task_group.cancel_scope.cancel()  # no reaping while we shut down
        with anyio.CancelScope(shield=True):
            await core.abandon_boots(SHUTDOWN_BOOT_WAIT_S)
        # The reaper's task group was entered by start(), so it is left here, outside any
        # scope opened since; the reaper is already cancelled, so this returns promptly.
        try:
            await self._stack.aclose()
        finally:
            with anyio.CancelScope(shield=True):
                await self.pool.close()  # its filler task has ended with the task group
                for pool in self.image_pools:
                    await pool.close()
                await self._boots.close()  # the spare VMMs
                await core.detach_all()
                if core.store is not None:
                    await core.store.close()

    async def __aenter__(self) -> SandboxManager:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- queries -------------------------------------------------------------------------

    async def get(self, sandbox_id: str) -> SandboxRecord:
        self._core.open_store()
        return SandboxRecord.from_row(await self._core.row(sandbox_id))

    async def list(
        self,
        *,
        state: SandboxState | None = None,
        metadata: dict[str, str] | None = None,
        tenant_id: str | None = None,
    ) -> builtins.list[SandboxRecord]:
        """Sandboxes, oldest first; ``metadata`` pairs must all match; only
        ``tenant_id``'s when given."""
        rows = await self._core.open_store().list(
            states=None if state is None else {state}, metadata=metadata, tenant_id=tenant_id
        )
        return [SandboxRecord.from_row(row) for row in rows]

    async def drop_spares(self, image: str) -> None:
        """Kill the spare VMMs made for ``image`` (a ref): the image was deleted."""
        await self._boots.drop_spares(image)

    @contextlib.asynccontextmanager
    async def reserve_address(self) -> AsyncIterator[str]:
        """A guest address for a VM that has no sandbox row (an image builder), held
        until the block ends: sandbox admission skips it as it skips live sandboxes'."""
        core = self._core
        async with core.admission:
            address = await allocate_address(
                self._settings, core.open_store(), core.reserved_addresses
            )
            core.reserved_addresses.add(address)
        try:
            yield address
        finally:
            core.reserved_addresses.discard(address)

    async def image_names(self) -> builtins.list[str]:
        return await anyio.to_thread.run_sync(self._images.names)

    async def exec_log(self, sandbox_id: str) -> builtins.list[ExecLogEntry]:
        """The commands run in a sandbox, oldest first."""
        store = self._core.open_store()
        await self._core.row(sandbox_id)
        return await store.exec_log(sandbox_id)

    # -- create --------------------------------------------------------------------------

    async def create(
        self,
        *,
        image: str | None = None,
        vcpus: int | None = None,
        memory_mib: int | None = None,
        timeout_s: int | None = None,
        metadata: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
        snapshot_id: str | None = None,
        tenant_id: str = LOCAL_TENANT_ID,
        network: Mapping[str, object] | None = None,
    ) -> SandboxRecord:
        """Start a sandbox for ``tenant_id``; returns once it is ``running`` (its agent
        answered).

        It comes from the warm pool when one is ready, else from the image's template
        snapshot, else (no template possible) from a cold boot. With ``snapshot_id`` it
        is a fork of that snapshot instead (same image and shape; SnapshotMismatch when
        the request names others).

        Raises InvalidRequest / ImageNotFound / NotFound before anything starts,
        QuotaExceeded at ``max_sandboxes`` live sandboxes or past a tenant quota
        (:mod:`emberbox.service.tenancy.quotas`), the start's own error
        (BootTimeout, VMMCrashed, SnapshotCorrupt, HostError; the row is then ``error``)
        or Conflict if killed while starting.
        """
        store = self._core.open_store()
        source: SnapshotRow | None = None
        if snapshot_id is not None:
            source = await self._snapshots.snapshot_row(snapshot_id)
            if image is not None:  # the name as the tenant sees it: the ref the row has
                image = await anyio.to_thread.run_sync(resolve_ref, self._images, image, tenant_id)
            image, vcpus, memory_mib = snapshots.fork_shape(source, image, vcpus, memory_mib)
            await self._snapshots.check_image_unchanged(source)
        spec = validation.validate_spec(
            self._settings, image, vcpus, memory_mib, timeout_s, metadata, env
        )
        await storage.require_free_space(self._settings, "creating a sandbox")
        ref = await anyio.to_thread.run_sync(resolve_ref, self._images, spec.image, tenant_id)
        spec = dataclasses.replace(spec, image=ref)  # a tenant's own image: its ref
        shape = PoolShape(spec.image, spec.vcpus, spec.memory_mib)
        # Networked sandboxes never come from the pool (its VMs have no network).
        policy = None
        if network is not None:
            policy = await validation.resolve_network(self._settings, network)
        pools = [self.pool, *self.image_pools]
        pool = next((p for p in pools if p.shape == shape), self.pool)
        pooled = None if source is not None or policy else pool.take(shape, refill=False)
        hand_out = None if pooled is None else HandOut(pooled)
        if hand_out is not None:  # the guest answers while we admit
            hand_out.started = self.in_background(hand_out.greet, hand_out.pooled.id)
        try:
            row = await self._boots.admit(
                store,
                spec,
                pooled.id if pooled else None,
                snapshot_id=snapshot_id,
                tenant_id=tenant_id,
                networked=policy is not None,
            )
            starter = self._boots.starter(
                row, source, hand_out, network_plan(self._settings, policy, row)
            )
            return await self._boots.boot_locked(row, starter)
        finally:
            if hand_out is not None:
                with anyio.CancelScope(shield=True):
                    await hand_out.discard()
                pool.refill()  # only now: starting a VM would hold up this hand-out

    def pool_ready(self, image: str | None = None) -> int:
        """How many sandboxes the warm pool holds ready (for ``image``, if given)."""
        return sum(p.ready_count(image) for p in [self.pool, *self.image_pools])

    def in_background(
        self, func: Callable[[str], Coroutine[None, None, None]], arg: str, /
    ) -> bool:
        """Start ``func(arg)`` in the manager's task group, which close() waits for (a
        one-shot run's kill: its caller does not wait). ``func`` must not raise. False
        when the manager is not open (then nothing was started)."""
        if self._task_group is None or self._core.phase is not Phase.OPEN:
            return False
        self._task_group.start_soon(func, arg)
        return True

    # -- exec ----------------------------------------------------------------------------

    async def exec(
        self,
        sandbox_id: str,
        spec: ExecSpec,
        *,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> ExecResult:
        """Run ``spec`` in a running sandbox, its ``env`` merged over the sandbox's, its
        ``timeout_s`` (default ``default_exec_timeout_s``) capped at ``max_exec_timeout_s``,
        its output at ``exec_output_max_bytes``. Raises ExecTimeout (see run_command)."""
        return await execs.run_exec(
            self._core, sandbox_id, spec, on_stdout=on_stdout, on_stderr=on_stderr
        )

    # -- kill, timeout, failure ------------------------------------------------------------

    async def kill(self, sandbox_id: str) -> None:
        """Stop a sandbox: its VMM ends, its files go, it ends ``stopped``. Idempotent;
        safe to call concurrently; interrupts a boot in progress."""
        core = self._core
        core.open_store()
        row = await core.row(sandbox_id)
        if row.state == SandboxState.STOPPED:
            return
        boot = core.boots.get(sandbox_id)
        if boot is not None:
            boot.interrupt(None)
        async with core.lock(sandbox_id):
            with anyio.CancelScope(shield=True):
                await core.stop_locked(sandbox_id)

    async def set_timeout(self, sandbox_id: str, timeout_s: int) -> SandboxRecord:
        """Make a running sandbox expire ``timeout_s`` seconds from now."""
        validation.check_range("timeout_s", timeout_s, 1, self._settings.max_timeout_s)
        fields: SandboxFields = {
            "timeout_s": timeout_s,
            "expires_at": utcnow() + timedelta(seconds=timeout_s),
        }
        try:
            row = await self._core.open_store().transition(
                sandbox_id, {SandboxState.RUNNING}, SandboxState.RUNNING, **fields
            )
        except errors.Conflict as exc:
            state = exc.details.get("state", "not running")
            raise errors.Conflict(
                f"sandbox {sandbox_id} is {state}; only a running sandbox's timeout can change",
                sandbox_id=sandbox_id,
                state=state,
            ) from exc
        return SandboxRecord.from_row(row)

    # -- snapshots, pause and resume (emberbox.service.snapshots.operations) ----------------------

    async def snapshot(self, sandbox_id: str) -> SnapshotRecord:
        """Save a running sandbox (memory + disk; the guest pauses only for the save).
        New sandboxes can be forked from it with ``create(snapshot_id=...)``."""
        return await self._snapshots.snapshot(sandbox_id)

    async def pause(self, sandbox_id: str) -> SandboxRecord:
        """Save a running sandbox to disk and end its VMM (its memory is freed); resume
        brings back its processes and files. A paused sandbox does not expire and does
        not count against ``max_sandboxes``."""
        return await self._snapshots.pause(sandbox_id)

    async def resume(self, sandbox_id: str) -> SandboxRecord:
        """Restore a paused sandbox where it left off (a new timeout period starts)."""
        return await self._snapshots.resume(sandbox_id)

    async def list_snapshots(
        self, sandbox_id: str | None = None, *, tenant_id: str | None = None
    ) -> builtins.list[SnapshotRecord]:
        """Snapshots, oldest first (of ``sandbox_id``, of ``tenant_id``, when given)."""
        return await self._snapshots.list_snapshots(sandbox_id, tenant_id=tenant_id)

    async def get_snapshot(self, snapshot_id: str) -> SnapshotRecord:
        return await self._snapshots.get_snapshot(snapshot_id)

    async def delete_snapshot(self, snapshot_id: str) -> None:
        """Delete a snapshot and its files; Conflict while a live fork still needs it."""
        await self._snapshots.delete_snapshot(snapshot_id)

    # -- for the process and file services and the reaper ----------------------------------

    async def running_handle(self, sandbox_id: str) -> tuple[SandboxRecord, SandboxHandle]:
        """(Process and file services) a running sandbox and its handle; NotFound or
        Conflict otherwise."""
        self._core.open_store()
        row, handle = await self._core.running(sandbox_id)
        return SandboxRecord.from_row(row), handle

    async def expired_ids(self, now: datetime) -> builtins.list[str]:
        """(Reaper) running sandboxes past their ``expires_at``."""
        rows = await self._core.db().list(states={SandboxState.RUNNING}, expires_before=now)
        return [row.id for row in rows]

    def crashed_ids(self) -> builtins.list[str]:
        """(Reaper) running sandboxes whose VMM has ended on its own."""
        return [sid for sid, handle in self._core.live.items() if not handle.is_running()]

    async def mark_failed(self, sandbox_id: str, reason: str) -> None:
        """(Reaper) tear down a running sandbox whose VMM failed and record it ``error``
        (with its agent's protocol violation as the reason, if that is what ended it)."""
        handle = self._core.live.get(sandbox_id)
        reason = (handle.end_reason() if handle is not None else None) or reason
        async with self._core.lock(sandbox_id):
            with anyio.CancelScope(shield=True):
                await self.mark_failed_locked(sandbox_id, reason)

    async def mark_failed_locked(self, sandbox_id: str, reason: str) -> None:
        await self._core.mark_failed_locked(sandbox_id, reason)


def _guest_services(
    manager: SandboxManager, settings: Settings
) -> tuple[Processes, SandboxFiles, SandboxPorts]:
    """``manager.processes``, ``.files`` and ``.ports`` (their modules import this one)."""
    from emberbox.service.guestio.files import SandboxFiles
    from emberbox.service.guestio.ports import SandboxPorts
    from emberbox.service.guestio.processes import Processes

    return (
        Processes(manager, settings),
        SandboxFiles(manager, settings),
        SandboxPorts(manager, settings),
    )


__all__ = [
    "ExecLogEntry",  # what exec_log() answers
    "ImageCatalog",
    "OutputCallback",
    "SandboxAttacher",
    "SandboxFactory",
    "SandboxHandle",
    "SandboxManager",
    "SandboxRecord",
    "SandboxState",
]
