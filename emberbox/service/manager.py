"""The sandbox manager: create, exec in, time out and kill sandboxes; survive restarts.

The manager owns three things: the :class:`~emberbox.store.Store` (the truth about every
sandbox), the live :class:`SandboxHandle` of each running sandbox, and the reaper task.
Every state change goes through :func:`~emberbox.service.state.check_transition` and an
atomic compare-and-set in the store, under a per-sandbox lock so that create, kill and
the reaper never interleave on one sandbox. Execs take no lock: the guest agent
multiplexes any number of them.

Sandboxes are booted ``detached``: :meth:`SandboxManager.close` leaves them running and
the next :meth:`SandboxManager.start` re-attaches them (:mod:`emberbox.service.reconcile`).
``start`` and ``close`` must run in the same task (``async with manager:`` does).
"""

from __future__ import annotations

import builtins
import contextlib
import enum
import logging
import secrets
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Unpack

import anyio
import anyio.to_thread
from anyio.abc import TaskGroup

from emberbox import errors
from emberbox.config import Settings
from emberbox.guest.client import ExecLimits, ExecResult
from emberbox.net import plan as netplan
from emberbox.net.policy import EgressPolicy
from emberbox.service import orphans, quotas, snapshots, storage, validation
from emberbox.service.pool import PoolShape, WarmPool
from emberbox.service.reaper import Reaper
from emberbox.service.reconcile import reconcile
from emberbox.service.snapshots import SnapshotRecord
from emberbox.service.state import LIVE_STATES, SandboxState, check_transition
from emberbox.store import (
    LOCAL_TENANT_ID,
    ExecLogEntry,
    SandboxFields,
    SandboxRow,
    SnapshotRow,
    Store,
    tenants,
    utcnow,
)
from emberbox.vmm.base import Lifetime, SnapshotFiles

if TYPE_CHECKING:
    from emberbox.guest.client import FileInfo, ProcessInfo, ProcessStatus
    from emberbox.service.files import GuestFiles
    from emberbox.service.processes import Processes

log = logging.getLogger(__name__)

#: Called with each chunk of output as it arrives (sync or async; the sandbox decides).
OutputCallback = Callable[[bytes], Any]

ID_BYTES = 6  # 12 hex characters: short enough for unix socket paths under vms_dir
SHUTDOWN_BOOT_WAIT_S = 30.0


class SandboxHandle(Protocol):
    """A running sandbox as the manager drives it (``emberbox.service.sandbox.Sandbox``)."""

    @property
    def id(self) -> str: ...
    @property
    def pid(self) -> int | None: ...
    @property
    def work_dir(self) -> Path: ...
    def is_running(self) -> bool: ...
    async def exec(
        self,
        cmd: list[str] | str,
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout_s: float | None = None,
        stdin: bytes | None = None,
        output_max_bytes: int | None = None,
        limits: ExecLimits | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> ExecResult: ...
    async def kill(self) -> None:
        """End the VMM and remove its work dir. Idempotent."""

    async def detach(self) -> None:
        """Close the agent connection and leave the VMM running. Idempotent."""

    async def snapshot(self, dest: Path, *, stop: bool = False) -> SnapshotFiles:
        """Save the VM into ``dest``; with ``stop`` the VM ends (pause to disk)."""

    async def greet(self, sandbox_id: str) -> object:
        """Fresh entropy, clock, hostname and id (a pooled sandbox being handed out)."""

    # Background processes and files: the agent's calls (docs/protocol.md), passed through.
    async def spawn(
        self,
        cmd: list[str] | str,
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout_s: float | None = None,
        output_max_bytes: int | None = None,
        pty: tuple[int, int] | None = None,
    ) -> int: ...
    async def attach_process(
        self,
        pid: int,
        *,
        from_start: bool = True,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> ProcessStatus: ...
    async def write_stdin(
        self, pid: int, data: bytes | AsyncIterable[bytes], *, close: bool = False
    ) -> int: ...
    async def signal(self, pid: int, sig: str | int, *, group: bool = True) -> None: ...
    async def resize(self, pid: int, cols: int, rows: int) -> None: ...
    async def wait_process(self, pid: int, timeout_s: float | None = None) -> ProcessStatus: ...
    async def ps(self) -> list[ProcessInfo]: ...
    async def forget(self, pid: int) -> None: ...
    async def stat(self, path: str) -> FileInfo: ...
    async def list_dir(self, path: str) -> list[FileInfo]: ...
    def read_file(
        self, path: str, *, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]: ...
    async def write_file(
        self,
        path: str,
        data: bytes | AsyncIterable[bytes],
        *,
        mode: int = 0o644,
        offset: int = 0,
        truncate: bool = True,
    ) -> int: ...
    async def make_dir(self, path: str, *, parents: bool = True, mode: int = 0o755) -> None: ...
    async def remove(self, path: str, *, recursive: bool = False) -> None: ...
    async def rename(self, src: str, dst: str) -> None: ...
    def tar_out(self, path: str) -> AsyncIterator[bytes]: ...
    async def tar_in(self, path: str, data: AsyncIterable[bytes]) -> int: ...


class SandboxFactory(Protocol):
    """``Sandbox.start``: boot a sandbox; returns after the agent handshake."""

    def __call__(
        self,
        settings: Settings,
        *,
        image: str,
        vcpus: int,
        memory_mib: int,
        sandbox_id: str,
        lifetime: Lifetime,
    ) -> Awaitable[SandboxHandle]: ...


class SandboxRestorer(Protocol):
    """``Sandbox.restore``: start a sandbox from a snapshot; returns after the hello."""

    def __call__(
        self,
        settings: Settings,
        snapshot: SnapshotFiles,
        *,
        image: str,
        vcpus: int,
        memory_mib: int,
        sandbox_id: str,
        lifetime: Lifetime,
        adopt_disk: bool,
    ) -> Awaitable[SandboxHandle]: ...


class SandboxAttacher(Protocol):
    """``Sandbox.attach``: re-adopt a VMM left running by an earlier server."""

    def __call__(
        self,
        settings: Settings,
        *,
        sandbox_id: str,
        pid: int,
        image: str,
        vcpus: int,
        memory_mib: int,
    ) -> Awaitable[SandboxHandle]: ...


class ImageCatalog(Protocol):
    """``ImageRegistry``: which images exist (``get`` raises ``errors.ImageNotFound``)."""

    def names(self) -> list[str]: ...
    def get(self, name: str) -> object: ...


@dataclass(frozen=True)
class SandboxRecord:
    """A sandbox as the service reports it. Times are UTC."""

    id: str
    state: SandboxState
    image: str
    vcpus: int
    memory_mib: int
    metadata: dict[str, str]
    env: dict[str, str]
    timeout_s: int
    created_at: datetime
    expires_at: datetime
    ip_address: str | None
    vmm_pid: int | None
    work_dir: Path | None
    error: str | None
    snapshot_id: str | None = None  # the snapshot this sandbox was forked from

    @classmethod
    def from_row(cls, row: SandboxRow) -> SandboxRecord:
        return cls(
            id=row.id,
            state=SandboxState(row.state),
            image=row.image,
            vcpus=row.vcpus,
            memory_mib=row.memory_mib,
            metadata=dict(row.metadata),
            env=dict(row.env),
            timeout_s=row.timeout_s,
            created_at=row.created_at,
            expires_at=row.expires_at,
            ip_address=row.ip_address,
            vmm_pid=row.vmm_pid,
            work_dir=row.work_dir,
            error=row.error,
            snapshot_id=row.snapshot_id,
        )


class _Phase(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


@dataclass
class _Boot:
    """A boot in progress, so that kill() and close() can interrupt it."""

    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    done: anyio.Event = field(default_factory=anyio.Event)
    interrupted: bool = False
    error: str | None = None  # None when interrupted by kill(): the row ends ``stopped``

    def interrupt(self, error: str | None) -> None:
        if not self.interrupted:
            self.interrupted, self.error = True, error
        self.scope.cancel()


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
        default_factory, default_attacher, default_restorer = _default_handles()
        self._factory = sandbox_factory or default_factory
        self._attacher = sandbox_attacher or default_attacher
        self._restorer = sandbox_restorer or default_restorer
        self.pool: WarmPool[SandboxHandle] = WarmPool(settings, self._fill_pool, ID_BYTES)
        self._images = image_registry or _default_registry(settings)
        self._phase = _Phase.NEW
        self._store: Store | None = None
        self._live: dict[str, SandboxHandle] = {}
        self._locks: dict[str, anyio.Lock] = {}
        self._boots: dict[str, _Boot] = {}
        self._admission = anyio.Lock()  # makes "count live, then insert" atomic
        self._stack = contextlib.AsyncExitStack()
        self._task_group: TaskGroup | None = None
        self.reaper = Reaper(self, settings.reaper_interval_s)
        self.processes: Processes
        self.files: GuestFiles
        self.processes, self.files = _guest_services(self, settings)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store, reconcile with what survived a restart, start the reaper."""
        if self._phase is not _Phase.NEW:
            raise errors.Conflict(f"sandbox manager is {self._phase.value}; cannot start")
        self._phase = _Phase.OPEN
        try:
            vms_dir = self._settings.vms_dir
            await anyio.to_thread.run_sync(lambda: vms_dir.mkdir(0o700, True, True))
            self._store = await Store.open(self._settings.db_path)
            report = await reconcile(self._settings, self._store, self._attach_row)
            self._live.update(report.attached)
            self._task_group = await self._stack.enter_async_context(anyio.create_task_group())
            await self._task_group.start(self.reaper.run)
            await self._task_group.start(self.pool.run)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop the reaper, detach from running sandboxes (they keep running), close the
        store. Boots in progress are abandoned (``error``). Idempotent."""
        if self._phase is _Phase.CLOSED:
            return
        self._phase = _Phase.CLOSED
        if self._task_group is not None:
            self._task_group.cancel_scope.cancel()  # no reaping while we shut down
        with anyio.CancelScope(shield=True):
            for boot in list(self._boots.values()):
                boot.interrupt("server shut down during boot")
            with anyio.move_on_after(SHUTDOWN_BOOT_WAIT_S):
                for boot in list(self._boots.values()):
                    await boot.done.wait()
        # The reaper's task group was entered by start(), so it is left here, outside any
        # scope opened since; the reaper is already cancelled, so this returns promptly.
        try:
            await self._stack.aclose()
        finally:
            with anyio.CancelScope(shield=True):
                await self.pool.close()  # its filler task has ended with the task group
                live, self._live = self._live, {}
                for sandbox_id, handle in live.items():
                    try:
                        await handle.detach()
                    except Exception:
                        log.exception("sandbox %s: detaching failed", sandbox_id)
                if self._store is not None:
                    await self._store.close()

    async def __aenter__(self) -> SandboxManager:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- queries -------------------------------------------------------------------------

    async def get(self, sandbox_id: str) -> SandboxRecord:
        self._open_store()
        return SandboxRecord.from_row(await self._row(sandbox_id))

    async def list(
        self,
        *,
        state: SandboxState | None = None,
        metadata: dict[str, str] | None = None,
        tenant_id: str | None = None,
    ) -> builtins.list[SandboxRecord]:
        """Sandboxes, oldest first; ``metadata`` pairs must all match; only
        ``tenant_id``'s when given."""
        rows = await self._open_store().list(
            states=None if state is None else {state}, metadata=metadata, tenant_id=tenant_id
        )
        return [SandboxRecord.from_row(row) for row in rows]

    async def image_names(self) -> builtins.list[str]:
        return await anyio.to_thread.run_sync(self._images.names)

    async def exec_log(self, sandbox_id: str) -> builtins.list[ExecLogEntry]:
        """The commands run in a sandbox, oldest first."""
        store = self._open_store()
        await self._row(sandbox_id)
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
        (:mod:`emberbox.service.quotas`), the start's own error
        (BootTimeout, VMMCrashed, SnapshotCorrupt, HostError; the row is then ``error``)
        or Conflict if killed while starting.
        """
        store = self._open_store()
        source: SnapshotRow | None = None
        if snapshot_id is not None:
            source = await self._snapshot_row(snapshot_id)
            image, vcpus, memory_mib = snapshots.fork_shape(source, image, vcpus, memory_mib)
            await self._check_image_unchanged(source)
        spec = validation.validate_spec(
            self._settings, image, vcpus, memory_mib, timeout_s, metadata, env
        )
        await storage.require_free_space(self._settings, "creating a sandbox")
        await anyio.to_thread.run_sync(self._images.get, spec.image)
        shape = PoolShape(spec.image, spec.vcpus, spec.memory_mib)
        # Networked sandboxes never come from the pool (its VMs have no network).
        policy = await anyio.to_thread.run_sync(
            validation.validate_network, self._settings, network
        )
        pooled = None if source is not None or policy else self.pool.take(shape)
        try:
            row = await self._admit(
                store,
                spec,
                pooled.id if pooled else None,
                snapshot_id=snapshot_id,
                tenant_id=tenant_id,
                networked=policy is not None,
            )
        except BaseException:
            if pooled is not None:
                with anyio.CancelScope(shield=True):
                    await pooled.kill()
            raise
        boot = self._boots[row.id] = _Boot()
        lock = self._lock(row.id)
        try:
            with anyio.CancelScope(shield=True):  # only a kill() in progress holds it
                await lock.acquire()
            try:
                plan = _network_plan(self._settings, policy, row)
                starter = self._starter(row, source, pooled, plan)
                return await self._boot(row, boot, starter)
            finally:
                lock.release()
        finally:
            del self._boots[row.id]
            boot.done.set()

    def _starter(
        self,
        row: SandboxRow,
        source: SnapshotRow | None,
        pooled: SandboxHandle | None,
        network: netplan.NetworkPlan | None = None,
    ) -> Callable[[], Awaitable[SandboxHandle]]:
        """How ``row``'s VM comes to be: handed out by the pool, forked, or started."""
        settings = self._settings
        net = _network_kwargs(network)

        async def hand_out(pooled: SandboxHandle) -> SandboxHandle:
            try:
                await pooled.greet(row.id)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await pooled.kill()
                raise
            return pooled

        if pooled is not None:
            return lambda: hand_out(pooled)
        if source is not None:

            async def fork(source: SnapshotRow) -> SandboxHandle:
                with snapshots.public_snapshot_errors(f"snapshot {source.id}"):
                    return await self._restorer(
                        settings,
                        snapshots.snapshot_files(source),
                        image=row.image,
                        vcpus=row.vcpus,
                        memory_mib=row.memory_mib,
                        sandbox_id=row.id,
                        lifetime="detached",
                        adopt_disk=False,
                        **net,
                    )

            return lambda: fork(source)
        return lambda: self._factory(
            settings,
            image=row.image,
            vcpus=row.vcpus,
            memory_mib=row.memory_mib,
            sandbox_id=row.id,
            lifetime="detached",
            **net,
        )

    async def _fill_pool(self, shape: PoolShape, sandbox_id: str) -> SandboxHandle:
        """(Pool) one sandbox of ``shape`` restored from its template. It runs only our
        own ``true`` (which warms the VMM's translation of the exec path), never a
        caller's command."""
        handle = await self._factory(
            self._settings,
            image=shape.image,
            vcpus=shape.vcpus,
            memory_mib=shape.memory_mib,
            sandbox_id=sandbox_id,
            lifetime="detached",
        )
        try:
            await handle.exec(["true"], timeout_s=30)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await handle.kill()
            raise
        return handle

    def pool_ready(self, image: str | None = None) -> int:
        """How many sandboxes the warm pool holds ready (for ``image``, if given)."""
        return self.pool.ready_count(image)

    async def _admit(
        self,
        store: Store,
        spec: validation.Spec,
        sandbox_id: str | None = None,
        *,
        snapshot_id: str | None = None,
        tenant_id: str = LOCAL_TENANT_ID,
        networked: bool = False,
    ) -> SandboxRow:
        async with self._admission:
            await self._check_quota(store, tenant_id, spec.vcpus, spec.memory_mib)
            # Under _admission, from the store: unique among live sandboxes, and what
            # a restarted server sees too.
            ip_address = await _allocate_address(self._settings, store) if networked else None
            for _ in range(5):
                chosen = sandbox_id or secrets.token_hex(ID_BYTES)
                now = utcnow()
                row = SandboxRow(
                    id=chosen,
                    state=SandboxState.CREATING,
                    image=spec.image,
                    vcpus=spec.vcpus,
                    memory_mib=spec.memory_mib,
                    timeout_s=spec.timeout_s,
                    metadata=spec.metadata,
                    env=spec.env,
                    created_at=now,
                    expires_at=now + timedelta(seconds=spec.timeout_s),
                    updated_at=now,
                    work_dir=self._settings.vms_dir / chosen,
                    snapshot_id=snapshot_id,
                    tenant_id=tenant_id,
                    ip_address=ip_address,
                )
                try:
                    return await store.insert(row)
                except errors.Conflict:
                    if sandbox_id is not None:  # a pooled VM's id: it cannot change
                        raise
        raise errors.EmberboxError("could not allocate a unique sandbox id")

    async def _check_quota(
        self, store: Store, tenant_id: str = LOCAL_TENANT_ID, vcpus: int = 0, memory_mib: int = 0
    ) -> None:
        """Call holding ``_admission`` (then a check and the insert after it are atomic:
        two creates cannot both take the last slot)."""
        limits = quotas.limits_for(self._settings, await store.call(_tenant_getter(tenant_id)))
        if limits is not None:
            usage = await store.call(_usage_getter(tenant_id))
            quotas.check_sandbox(limits, usage, vcpus, memory_mib)
        limit = self._settings.max_sandboxes
        live = await store.count(states=LIVE_STATES)
        if live >= limit:
            raise errors.QuotaExceeded(
                f"sandbox limit reached: {live} sandboxes are creating or running "
                f"(max_sandboxes={limit}); kill one first",
                limit=limit,
                live=live,
            )

    async def _boot(
        self, row: SandboxRow, boot: _Boot, start: Callable[[], Awaitable[SandboxHandle]]
    ) -> SandboxRecord:
        """Boot ``row`` (state ``creating``, lock held); whatever happens, the row leaves
        ``creating`` and nothing of a failed boot stays behind."""
        handle: SandboxHandle | None = None
        try:
            if (await self._row(row.id)).state != SandboxState.CREATING:
                boot.interrupt(None)  # a kill() got the lock before us
            if not boot.interrupted:
                with boot.scope:
                    handle = await start()
            if handle is not None and not boot.interrupted:
                self._live[row.id] = handle
                return await self._move(
                    row.id,
                    SandboxState.CREATING,
                    SandboxState.RUNNING,
                    vmm_pid=handle.pid,
                    work_dir=handle.work_dir,
                    expires_at=utcnow() + timedelta(seconds=row.timeout_s),
                )
        except BaseException as exc:
            # An error raised because kill()/close() interrupted the boot is that
            # interruption, handled below; anything else (or our caller's cancellation)
            # is a failed boot.
            if not (boot.interrupted and isinstance(exc, Exception)):
                error = boot.error if boot.interrupted else _failure_reason(exc)
                with anyio.CancelScope(shield=True):
                    await self._abort_boot(row, self._live.pop(row.id, None) or handle, error)
                raise
        with anyio.CancelScope(shield=True):
            await self._abort_boot(row, self._live.pop(row.id, None) or handle, boot.error)
        how = "killed" if boot.error is None else "abandoned (server shutting down)"
        raise errors.Conflict(f"sandbox {row.id} was {how} while booting", sandbox_id=row.id)

    async def _abort_boot(
        self, row: SandboxRow, handle: SandboxHandle | None, error: str | None
    ) -> None:
        """Leave nothing of a boot that did not finish. A row still ``creating`` ends
        ``error`` (with the reason) or, when it was killed, ``stopped``. Call shielded."""
        try:
            await self._teardown(row, handle)
        except Exception:
            log.exception("sandbox %s: cleaning up a failed boot", row.id)
        current = await self._row(row.id)
        if current.state != SandboxState.CREATING:
            return  # already settled by a kill() that ran before the boot
        if error is not None:
            await self._move(row.id, SandboxState.CREATING, SandboxState.ERROR, error=error)
        else:
            await self._move(row.id, SandboxState.CREATING, SandboxState.STOPPING)
            await self._move(row.id, SandboxState.STOPPING, SandboxState.STOPPED)
            self._locks.pop(row.id, None)  # stopped is final: no one needs to serialise

    # -- exec ----------------------------------------------------------------------------

    async def exec(
        self,
        sandbox_id: str,
        cmd: builtins.list[str] | str,
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout_s: float | None = None,
        stdin: bytes | None = None,
        limits: ExecLimits | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> ExecResult:
        """Run ``cmd`` (argv, or a string for ``sh -c``) in a running sandbox.

        ``timeout_s`` defaults to ``default_exec_timeout_s`` and is capped at
        ``max_exec_timeout_s``; ``env`` is merged over the sandbox's env. ``limits``
        (memory, processes) puts the command in a cgroup of its own in the guest.
        """
        self._open_store()
        validation.validate_command(cmd, cwd)
        validation.validate_env(env or {}, "env")
        timeout = self._exec_timeout(timeout_s)
        row, handle = await self._running(sandbox_id)
        started, t0 = utcnow(), time.monotonic()
        try:
            result = await handle.exec(
                cmd,
                env={**row.env, **(env or {})},
                cwd=cwd,
                timeout_s=timeout,
                stdin=stdin,
                output_max_bytes=self._settings.exec_output_max_bytes,
                limits=limits,
                on_stdout=on_stdout,
                on_stderr=on_stderr,
            )
        except errors.ExecTimeout as exc:
            partial = exc.result if isinstance(exc.result, ExecResult) else None
            await self._log_exec(sandbox_id, cmd, started, t0, partial, timed_out=True)
            raise
        except errors.EmberboxError as exc:
            await self._log_exec(sandbox_id, cmd, started, t0, None, timed_out=False)
            current = await self._db().get(sandbox_id)
            if current is not None and current.state != SandboxState.RUNNING:
                raise _not_running(sandbox_id, current.state) from exc  # killed meanwhile
            raise
        await self._log_exec(sandbox_id, cmd, started, t0, result, timed_out=result.timed_out)
        return result

    def _exec_timeout(self, timeout_s: float | None) -> float:
        if timeout_s is None:
            timeout_s = self._settings.default_exec_timeout_s
        if not timeout_s > 0:
            raise errors.InvalidRequest(f"timeout_s must be positive (got {timeout_s})")
        return min(float(timeout_s), self._settings.max_exec_timeout_s)

    async def _log_exec(
        self,
        sandbox_id: str,
        cmd: builtins.list[str] | str,
        started: datetime,
        t0: float,
        result: ExecResult | None,
        *,
        timed_out: bool,
    ) -> None:
        entry = ExecLogEntry(
            sandbox_id=sandbox_id,
            command=cmd,
            started_at=started,
            duration_ms=result.duration_ms if result else (time.monotonic() - t0) * 1000,
            exit_code=result.exit_code if result else None,
            timed_out=timed_out,
        )
        try:  # the caller's result matters more than its log line
            await self._db().log_exec(entry)
        except Exception:
            log.exception("sandbox %s: could not write the exec log", sandbox_id)

    # -- kill, timeout, failure ------------------------------------------------------------

    async def kill(self, sandbox_id: str) -> None:
        """Stop a sandbox: its VMM ends, its files go, it ends ``stopped``. Idempotent;
        safe to call concurrently; interrupts a boot in progress."""
        self._open_store()
        row = await self._row(sandbox_id)
        if row.state == SandboxState.STOPPED:
            return
        boot = self._boots.get(sandbox_id)
        if boot is not None:
            boot.interrupt(None)
        async with self._lock(sandbox_id):
            with anyio.CancelScope(shield=True):
                await self._stop_locked(sandbox_id)

    async def _stop_locked(self, sandbox_id: str) -> None:
        row = await self._row(sandbox_id)
        if row.state == SandboxState.STOPPED:
            return
        if row.state != SandboxState.STOPPING:
            await self._move(sandbox_id, SandboxState(row.state), SandboxState.STOPPING)
        try:
            await self._teardown(row, self._live.pop(sandbox_id, None))
        except Exception as exc:
            await self._move(
                sandbox_id, SandboxState.STOPPING, SandboxState.ERROR, error=f"kill failed: {exc}"
            )
            raise
        await self._move(sandbox_id, SandboxState.STOPPING, SandboxState.STOPPED)
        self._locks.pop(sandbox_id, None)

    async def set_timeout(self, sandbox_id: str, timeout_s: int) -> SandboxRecord:
        """Make a running sandbox expire ``timeout_s`` seconds from now."""
        validation.check_range("timeout_s", timeout_s, 1, self._settings.max_timeout_s)
        fields: SandboxFields = {
            "timeout_s": timeout_s,
            "expires_at": utcnow() + timedelta(seconds=timeout_s),
        }
        try:
            row = await self._open_store().transition(
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

    # -- snapshots, pause and resume ------------------------------------------------------

    async def snapshot(self, sandbox_id: str) -> SnapshotRecord:
        """Save a running sandbox (memory + disk; the guest pauses only for the save).
        New sandboxes can be forked from it with ``create(snapshot_id=...)``."""
        store = self._open_store()
        async with self._lock(sandbox_id):
            with anyio.CancelScope(shield=True):  # a half-taken snapshot would stop the VM
                row, handle = await self._running(sandbox_id)
                limits = quotas.limits_for(
                    self._settings, await store.call(_tenant_getter(row.tenant_id))
                )
                if limits is not None:  # early, before the work (the insert checks again)
                    quotas.check_snapshot(limits, await store.call(_usage_getter(row.tenant_id)))
                snapshot_id = "snap-" + secrets.token_hex(ID_BYTES)
                dest = self._settings.snapshots_dir / snapshot_id
                await anyio.to_thread.run_sync(snapshots.private_dir, dest.parent)
                limit = self._settings.snapshot_timeout_s
                try:
                    with anyio.fail_after(limit):
                        files = await handle.snapshot(dest)
                except TimeoutError as exc:
                    raise errors.VMMError(f"snapshot took longer than {limit:g} s") from exc
                size = await anyio.to_thread.run_sync(snapshots.disk_usage, dest)
                snap = SnapshotRow(
                    id=snapshot_id,
                    sandbox_id=sandbox_id,
                    image=row.image,
                    vcpus=row.vcpus,
                    memory_mib=row.memory_mib,
                    vmm=files.vmm,
                    vmm_version=files.vmm_version,
                    size_bytes=size,
                    created_at=utcnow(),
                    path=dest,
                    image_hash=await self._image_hash(row.image),
                    tenant_id=row.tenant_id,
                )
                try:
                    tenant_max = None if limits is None else limits.max_snapshots
                    await store.insert_snapshot(snap, tenant_max=tenant_max)
                except BaseException:
                    await anyio.to_thread.run_sync(snapshots.remove_tree, dest)
                    raise
        return snapshots.snapshot_record(snap)

    async def pause(self, sandbox_id: str) -> SandboxRecord:
        """Save a running sandbox to disk and end its VMM (its memory is freed); resume
        brings back its processes and files. A paused sandbox does not expire and does
        not count against ``max_sandboxes``."""
        self._open_store()
        async with self._lock(sandbox_id):
            with anyio.CancelScope(shield=True):
                _, handle = await self._running(sandbox_id)
                dest = self._settings.snapshots_dir / f"paused-{sandbox_id}"
                await anyio.to_thread.run_sync(snapshots.private_dir, dest.parent)
                await anyio.to_thread.run_sync(snapshots.remove_tree, dest)  # a stale one
                try:
                    files = await handle.snapshot(dest, stop=True)
                except errors.EmberboxError as exc:
                    if not handle.is_running():  # the VMM is gone, and its state with it
                        await self.mark_failed_locked(sandbox_id, f"pause failed: {exc}")
                    raise
                self._live.pop(sandbox_id, None)
                await anyio.to_thread.run_sync(snapshots.write_meta, dest, files)
                record = await self._move(
                    sandbox_id,
                    SandboxState.RUNNING,
                    SandboxState.PAUSED,
                    paused_dir=dest,
                    vmm_pid=None,
                )
        return record

    async def resume(self, sandbox_id: str) -> SandboxRecord:
        """Restore a paused sandbox where it left off (a new timeout period starts)."""
        store = self._open_store()
        async with self._lock(sandbox_id):
            with anyio.CancelScope(shield=True):
                row = await self._row(sandbox_id)
                if row.state != SandboxState.PAUSED or row.paused_dir is None:
                    raise _not_running(sandbox_id, row.state, "only a paused sandbox resumes")
                files = await anyio.to_thread.run_sync(snapshots.read_meta, row.paused_dir)
                async with self._admission:
                    await self._check_quota(store, row.tenant_id, row.vcpus, row.memory_mib)
                    with snapshots.public_snapshot_errors(
                        f"the saved state of sandbox {sandbox_id}"
                    ):
                        handle = await self._restorer(
                            self._settings,
                            files,
                            image=row.image,
                            vcpus=row.vcpus,
                            memory_mib=row.memory_mib,
                            sandbox_id=sandbox_id,
                            lifetime="detached",
                            adopt_disk=True,
                            **_network_kwargs(await _recorded_plan(self._settings, sandbox_id)),
                        )
                    self._live[sandbox_id] = handle
                    record = await self._move(
                        sandbox_id,
                        SandboxState.PAUSED,
                        SandboxState.RUNNING,
                        paused_dir=None,
                        vmm_pid=handle.pid,
                        work_dir=handle.work_dir,
                        expires_at=utcnow() + timedelta(seconds=row.timeout_s),
                    )
                await anyio.to_thread.run_sync(snapshots.remove_tree, row.paused_dir)
        return record

    async def list_snapshots(
        self, sandbox_id: str | None = None, *, tenant_id: str | None = None
    ) -> builtins.list[SnapshotRecord]:
        """Snapshots, oldest first (of ``sandbox_id``, of ``tenant_id``, when given)."""
        rows = await self._open_store().list_snapshots(sandbox_id, tenant_id=tenant_id)
        return [snapshots.snapshot_record(row) for row in rows]

    async def get_snapshot(self, snapshot_id: str) -> SnapshotRecord:
        self._open_store()
        return snapshots.snapshot_record(await self._snapshot_row(snapshot_id))

    async def delete_snapshot(self, snapshot_id: str) -> None:
        """Delete a snapshot and its files; Conflict while a live fork still needs it."""
        store = self._open_store()
        row = await self._snapshot_row(snapshot_id)
        in_use = {
            SandboxState.CREATING,
            SandboxState.RUNNING,
            SandboxState.PAUSED,
            SandboxState.STOPPING,
        }
        await store.delete_snapshot(snapshot_id, unless_used_in=in_use)
        await anyio.to_thread.run_sync(snapshots.remove_tree, row.path)

    async def _image_hash(self, image: str) -> str:
        info = await anyio.to_thread.run_sync(self._images.get, image)
        return str(getattr(info, "image_hash", ""))

    async def _check_image_unchanged(self, source: SnapshotRow) -> None:
        """A snapshot loads only into a VM of the image build it was made from."""
        current = await self._image_hash(source.image)
        if source.image_hash and current != source.image_hash:
            raise errors.SnapshotMismatch(
                f"snapshot {source.id} was made from an earlier build of image "
                f"{source.image!r}, which has been rebuilt since; it cannot be restored",
                snapshot_id=source.id,
            )

    async def _snapshot_row(self, snapshot_id: str) -> SnapshotRow:
        row = await self._db().get_snapshot(snapshot_id)
        if row is None:
            raise errors.NotFound(f"no snapshot {snapshot_id}", snapshot_id=snapshot_id)
        return row

    async def _running(self, sandbox_id: str) -> tuple[SandboxRow, SandboxHandle]:
        row = await self._row(sandbox_id)
        handle = self._live.get(sandbox_id)
        if row.state != SandboxState.RUNNING or handle is None:
            raise _not_running(sandbox_id, row.state)
        return row, handle

    async def running_handle(self, sandbox_id: str) -> tuple[SandboxRecord, SandboxHandle]:
        """(Process and file services) a running sandbox and its handle; NotFound or
        Conflict otherwise."""
        self._open_store()
        row, handle = await self._running(sandbox_id)
        return SandboxRecord.from_row(row), handle

    async def expired_ids(self, now: datetime) -> builtins.list[str]:
        """(Reaper) running sandboxes past their ``expires_at``."""
        rows = await self._db().list(states={SandboxState.RUNNING}, expires_before=now)
        return [row.id for row in rows]

    def crashed_ids(self) -> builtins.list[str]:
        """(Reaper) running sandboxes whose VMM has ended on its own."""
        return [sid for sid, handle in self._live.items() if not handle.is_running()]

    async def mark_failed(self, sandbox_id: str, reason: str) -> None:
        """(Reaper) tear down a running sandbox whose VMM failed and record it ``error``."""
        async with self._lock(sandbox_id):
            with anyio.CancelScope(shield=True):
                await self.mark_failed_locked(sandbox_id, reason)

    async def mark_failed_locked(self, sandbox_id: str, reason: str) -> None:
        row = await self._row(sandbox_id)
        if row.state != SandboxState.RUNNING:
            return
        try:
            await self._teardown(row, self._live.pop(sandbox_id, None))
        except Exception:
            log.exception("sandbox %s: cleaning up after a VMM failure", sandbox_id)
        await self._move(sandbox_id, SandboxState.RUNNING, SandboxState.ERROR, error=reason)

    # -- plumbing ------------------------------------------------------------------------

    def _open_store(self) -> Store:
        """The store, for a public call: refused unless the manager is open."""
        if self._phase is not _Phase.OPEN:
            raise errors.Conflict(f"sandbox manager is {self._phase.value}; call start() first")
        return self._db()

    def _db(self) -> Store:
        """The store, for internal work (which may still run while close() waits)."""
        if self._store is None or self._store.closed:
            raise errors.Conflict("sandbox manager has no open store")
        return self._store

    async def _row(self, sandbox_id: str) -> SandboxRow:
        row = await self._db().get(sandbox_id)
        if row is None:
            raise errors.NotFound(f"no sandbox {sandbox_id}", sandbox_id=sandbox_id)
        return row

    def _lock(self, sandbox_id: str) -> anyio.Lock:
        return self._locks.setdefault(sandbox_id, anyio.Lock())

    async def _move(
        self,
        sandbox_id: str,
        src: SandboxState,
        dst: SandboxState,
        **fields: Unpack[SandboxFields],
    ) -> SandboxRecord:
        """The one way state changes: legal per the state machine, and a CAS in SQLite."""
        check_transition(src, dst, sandbox_id=sandbox_id)
        row = await self._db().transition(sandbox_id, {src}, dst, **fields)
        return SandboxRecord.from_row(row)

    async def _teardown(self, row: SandboxRow, handle: SandboxHandle | None) -> None:
        """End the VMM and remove the work dir. Without a handle (a failed boot, a
        crashed VMM) or when ``handle.kill()`` fails, find leftovers through ``/proc``."""
        work_dir = row.work_dir or self._settings.vms_dir / row.id
        vms_dir = self._settings.vms_dir
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

    async def _attach_row(self, row: SandboxRow) -> SandboxHandle:
        if row.vmm_pid is None:
            raise errors.VMMCrashed(f"sandbox {row.id} has no recorded VMM pid")
        return await self._attacher(
            self._settings,
            sandbox_id=row.id,
            pid=row.vmm_pid,
            image=row.image,
            vcpus=row.vcpus,
            memory_mib=row.memory_mib,
        )


def _not_running(sandbox_id: str, state: str, hint: str = "") -> errors.Conflict:
    message = f"sandbox {sandbox_id} is {state}" + (f"; {hint}" if hint else "")
    return errors.Conflict(message, sandbox_id=sandbox_id, state=state)


def _tenant_getter(tenant_id: str) -> Callable[[Any], tenants.TenantRow | None]:
    return lambda conn: tenants.get_tenant(conn, tenant_id)


def _usage_getter(tenant_id: str) -> Callable[[Any], tenants.Usage]:
    live = {state.value for state in LIVE_STATES}
    return lambda conn: tenants.usage(conn, tenant_id, live)


# States whose rows hold their ip_address (a paused sandbox gets its own back on resume).
_NETWORK_STATES = frozenset(
    {SandboxState.CREATING, SandboxState.RUNNING, SandboxState.PAUSED, SandboxState.STOPPING}
)


async def _allocate_address(settings: Settings, store: Store) -> str:
    """A free guest address of ``network_cidr``. Call holding ``_admission``."""
    rows = await store.list(states=_NETWORK_STATES)
    return netplan.allocate_address(settings, [row.ip_address for row in rows])


def _network_plan(
    settings: Settings, policy: EgressPolicy | None, row: SandboxRow
) -> netplan.NetworkPlan | None:
    if policy is None or row.ip_address is None:
        return None
    return netplan.plan_for(settings, policy, row.ip_address)


async def _recorded_plan(settings: Settings, sandbox_id: str) -> netplan.NetworkPlan | None:
    directory = netplan.net_dir(settings.data_dir)
    return await anyio.to_thread.run_sync(netplan.load, directory, sandbox_id)


def _network_kwargs(plan: netplan.NetworkPlan | None) -> dict[str, Any]:
    """``network=plan`` for the factory / restorer, only when there is one (the
    SandboxFactory protocol's implementations need not know about networks otherwise)."""
    return {} if plan is None else {"network": plan}


def _failure_reason(exc: BaseException) -> str:
    if isinstance(exc, anyio.get_cancelled_exc_class()):
        return "creation was cancelled"
    if isinstance(exc, errors.EmberboxError):
        return f"boot failed: {exc.message}"
    return f"boot failed: {type(exc).__name__}: {exc}"


# -- the real implementations, imported late (they pull in the VMM drivers) ------------------


def _default_handles() -> tuple[SandboxFactory, SandboxAttacher, SandboxRestorer]:
    """The real start (template restore, cold boot as fallback), attach and restore."""
    from emberbox.service.launch import Launcher

    launcher = Launcher()
    return launcher.start, launcher.attach, launcher.restore


def _guest_services(manager: SandboxManager, settings: Settings) -> tuple[Processes, GuestFiles]:
    """``manager.processes`` and ``manager.files`` (their modules import this one)."""
    from emberbox.service.files import GuestFiles
    from emberbox.service.processes import Processes

    return Processes(manager, settings), GuestFiles(manager, settings)


def _default_registry(settings: Settings) -> ImageCatalog:
    from emberbox.images.registry import ImageRegistry

    return ImageRegistry(settings)


__all__ = [
    "ImageCatalog",
    "OutputCallback",
    "SandboxAttacher",
    "SandboxFactory",
    "SandboxHandle",
    "SandboxManager",
    "SandboxRecord",
    "SandboxState",
]
