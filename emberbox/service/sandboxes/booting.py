"""How a sandbox comes to be: admission (quotas, a unique id, a guest address, the row
inserted ``creating``), the start itself (handed out by the warm pool, forked from a
snapshot, or started from the image), and leaving nothing behind when it fails.

Used by :meth:`~emberbox.service.sandboxes.manager.SandboxManager.create` and the warm
pool's filler.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import anyio
import anyio.to_thread

from emberbox import errors
from emberbox.agent_client.spec import ExecSpec
from emberbox.config import Settings
from emberbox.net import plan as netplan
from emberbox.net.policy import EgressPolicy
from emberbox.service import metrics
from emberbox.service.sandboxes import validation
from emberbox.service.sandboxes.core import ID_BYTES, Boot, ManagerCore
from emberbox.service.sandboxes.handles import (
    SandboxAttacher,
    SandboxFactory,
    SandboxHandle,
    SandboxRecord,
    SandboxRestorer,
)
from emberbox.service.sandboxes.state import LIVE_STATES, SandboxState
from emberbox.service.snapshots import records as snapshots
from emberbox.service.tenancy import quotas
from emberbox.service.vm import templates
from emberbox.service.vm.launch import spares_of
from emberbox.service.vm.pool import HELLO_FRESH_S, PoolShape
from emberbox.service.vm.spares import SpareShape
from emberbox.store import LOCAL_TENANT_ID, SandboxRow, SnapshotRow, Store, tenants, utcnow

log = logging.getLogger(__name__)

Starter = Callable[[], Awaitable[SandboxHandle]]


class BootFlows:
    """Admit, start (or re-adopt) and, on failure, undo sandboxes: for the manager and
    its pool."""

    def __init__(
        self,
        core: ManagerCore,
        factory: SandboxFactory,
        restorer: SandboxRestorer,
        attacher: SandboxAttacher,
    ) -> None:
        self._core = core
        self._settings = core.settings
        self._factory = factory
        self._restorer = restorer
        self._attacher = attacher
        # The launcher's spare VMMs (none with a fake factory): a create without a
        # network or snapshot takes a spare's id at admission, and so its VMM.
        self._spares = spares_of(factory)
        if self._spares is not None:
            self._spares.id_bytes = ID_BYTES

    async def close(self) -> None:
        """Kill the spare VMMs (the manager's close, shielded)."""
        if self._spares is not None:
            await self._spares.close()

    async def drop_spares(self, image: str) -> None:
        """Kill the spare VMMs of ``image`` (deleted: they map its template)."""
        if self._spares is not None:
            await self._spares.drop(image)

    def _claim_spare(
        self, image: str, vcpus: int, memory_mib: int, *, want: bool = True
    ) -> str | None:
        if self._spares is None:
            return None
        return self._spares.claim(SpareShape(image, vcpus, memory_mib), want=want)

    def _release_spare(self, sandbox_id: str | None) -> None:
        if self._spares is not None and sandbox_id is not None:
            self._spares.release(sandbox_id)

    async def attach(self, row: SandboxRow) -> SandboxHandle:
        """(Reconcile) re-adopt ``row``'s VMM, left running by an earlier server."""
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

    async def admit(
        self,
        store: Store,
        spec: validation.Spec,
        sandbox_id: str | None = None,
        *,
        snapshot_id: str | None = None,
        tenant_id: str = LOCAL_TENANT_ID,
        networked: bool = False,
    ) -> SandboxRow:
        """Insert ``spec``'s row, ``creating`` (with ``sandbox_id``: a pooled VM's id)."""
        async with self._core.admission:
            await self.check_quota(store, tenant_id, spec.vcpus, spec.memory_mib)
            # Under admission, from the store: unique among live sandboxes, and what
            # a restarted server sees too.
            ip_address = (
                await allocate_address(self._settings, store, self._core.reserved_addresses)
                if networked
                else None
            )
            plain = sandbox_id is None and snapshot_id is None and not networked
            shape = (spec.image, spec.vcpus, spec.memory_mib)
            spare = self._claim_spare(*shape) if plain else None
            try:
                for _ in range(5):
                    chosen = sandbox_id or spare or secrets.token_hex(ID_BYTES)
                    row = _new_row(self._settings, spec, chosen, snapshot_id, tenant_id, ip_address)
                    try:
                        return await store.insert(row)
                    except errors.Conflict:
                        if sandbox_id is not None:  # a pooled VM's id: it cannot change
                            raise
                        self._release_spare(spare)
                        spare = None
            except BaseException:
                self._release_spare(spare)
                raise
        raise errors.EmberboxError("could not allocate a unique sandbox id")

    async def check_quota(
        self, store: Store, tenant_id: str = LOCAL_TENANT_ID, vcpus: int = 0, memory_mib: int = 0
    ) -> None:
        """Call holding ``admission`` (then a check and the insert after it are atomic:
        two creates cannot both take the last slot)."""
        tenant, usage, live = await store.call(_admission_facts(tenant_id))
        limits = quotas.limits_for(self._settings, tenant)
        if limits is not None:
            quotas.check_sandbox(limits, usage, vcpus, memory_mib)
        limit = self._settings.max_sandboxes
        if live >= limit:
            raise errors.QuotaExceeded(
                f"sandbox limit reached: {live} sandboxes are creating or running "
                f"(max_sandboxes={limit}); kill one first",
                limit=limit,
                live=live,
            )

    def starter(
        self,
        row: SandboxRow,
        source: SnapshotRow | None,
        pooled: HandOut | None,
        network: netplan.NetworkPlan | None = None,
    ) -> Starter:
        """How ``row``'s VM comes to be: handed out by the pool, forked, or started
        (from the template, or cold); each path counted in the create metrics."""
        if pooled is not None:
            return _measured("pool", pooled.handle)
        net = network_kwargs(network)
        if source is not None:
            return _measured("fork", lambda: self._fork(row, source, net))
        return _measured(
            None,
            lambda: self._factory(
                self._settings,
                image=row.image,
                vcpus=row.vcpus,
                memory_mib=row.memory_mib,
                sandbox_id=row.id,
                lifetime="detached",
                **net,
            ),
        )

    async def _fork(
        self, row: SandboxRow, source: SnapshotRow, net: dict[str, Any]
    ) -> SandboxHandle:
        with snapshots.public_snapshot_errors(f"snapshot {source.id}"):
            return await self._restorer(
                self._settings,
                snapshots.snapshot_files(source),
                image=row.image,
                vcpus=row.vcpus,
                memory_mib=row.memory_mib,
                sandbox_id=row.id,
                lifetime="detached",
                adopt_disk=False,
                **net,
            )

    async def fill_pool(self, shape: PoolShape, sandbox_id: str) -> SandboxHandle:
        """(Pool) one sandbox of ``shape`` restored from its template. It runs only our
        own ``true`` (which warms the VMM's translation of the exec path), never a
        caller's command. A spare VMM of the shape, if there is one, becomes it (the
        pool's id for it is then the spare's)."""
        spare = self._claim_spare(shape.image, shape.vcpus, shape.memory_mib, want=False)
        try:
            handle = await self._factory(
                self._settings,
                image=shape.image,
                vcpus=shape.vcpus,
                memory_mib=shape.memory_mib,
                sandbox_id=spare or sandbox_id,
                lifetime="detached",
            )
        except BaseException:
            self._release_spare(spare)  # no-op once the launcher took it
            raise
        try:
            await handle.agent.exec(ExecSpec(["true"], timeout_s=30))
            if shape.image == self._settings.run_image:  # and the one-shot run path
                await templates.rehearse(handle.agent)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await handle.kill()
            raise
        return handle

    async def boot_locked(self, row: SandboxRow, start: Starter) -> SandboxRecord:
        """Boot ``row`` under its lock, registered in ``core.boots`` so that kill() and
        close() can interrupt it."""
        core = self._core
        boot = core.boots[row.id] = Boot()
        lock = core.lock(row.id)
        try:
            with anyio.CancelScope(shield=True):  # only a kill() in progress holds it
                await lock.acquire()
            try:
                return await self.boot(row, boot, start)
            finally:
                lock.release()
        finally:
            del core.boots[row.id]
            boot.done.set()

    async def boot(self, row: SandboxRow, boot: Boot, start: Starter) -> SandboxRecord:
        """Boot ``row`` (state ``creating``, lock held); whatever happens, the row leaves
        ``creating`` and nothing of a failed boot stays behind."""
        core = self._core
        handle: SandboxHandle | None = None
        try:
            if (await core.row(row.id)).state != SandboxState.CREATING:
                boot.interrupt(None)  # a kill() got the lock before us
            if not boot.interrupted:
                with boot.scope:
                    handle = await start()
            if handle is not None and not boot.interrupted:
                core.live[row.id] = handle
                return await core.move(
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
                    await self.abort_boot(row, core.live.pop(row.id, None) or handle, error)
                raise
        with anyio.CancelScope(shield=True):
            await self.abort_boot(row, core.live.pop(row.id, None) or handle, boot.error)
        how = "killed" if boot.error is None else "abandoned (server shutting down)"
        raise errors.Conflict(f"sandbox {row.id} was {how} while booting", sandbox_id=row.id)

    async def abort_boot(
        self, row: SandboxRow, handle: SandboxHandle | None, error: str | None
    ) -> None:
        """Leave nothing of a boot that did not finish. A row still ``creating`` ends
        ``error`` (with the reason) or, when it was killed, ``stopped``. Call shielded."""
        core = self._core
        self._release_spare(row.id)  # claimed at admission, never started
        try:
            await core.teardown(row, handle)
        except Exception:
            log.exception("sandbox %s: cleaning up a failed boot", row.id)
        current = await core.row(row.id)
        if current.state != SandboxState.CREATING:
            return  # already settled by a kill() that ran before the boot
        if error is not None:
            await core.move(row.id, SandboxState.CREATING, SandboxState.ERROR, error=error)
        else:
            await core.move(row.id, SandboxState.CREATING, SandboxState.STOPPING)
            await core.move(row.id, SandboxState.STOPPING, SandboxState.STOPPED)
            core.locks.pop(row.id, None)  # stopped is final: no one needs to serialise


def _measured(path: str | None, start: Starter) -> Starter:
    """``start``, counted and timed in the create metrics under ``path`` (None: the
    handle's own ``origin``, template or cold)."""

    async def measured() -> SandboxHandle:
        t0 = time.monotonic()
        try:
            handle = await start()
        except BaseException:
            metrics.CREATES.labels(path or "template", "error").inc()
            raise
        label = path or str(getattr(handle, "origin", "template"))
        metrics.CREATES.labels(label, "ok").inc()
        metrics.CREATE_SECONDS.labels(label).observe(time.monotonic() - t0)
        return handle

    return measured


class HandOut:
    """A pooled sandbox's hand-out hello (fresh entropy, clock, its id), sent as soon as
    the pool gives the sandbox up, so that the guest answers while the service admits
    the create: the two overlap instead of following each other. The boot takes the
    greeted sandbox with :meth:`handle`; :meth:`discard` kills it if nothing took it
    (the admission failed, or a kill() ended the boot before its start)."""

    def __init__(self, pooled: SandboxHandle) -> None:
        self.pooled = pooled
        self.started = False  # set by whoever starts greet() in the background
        self._answered = anyio.Event()
        self._error: Exception | None = None
        self._greeted = False
        self._taken = False

    async def greet(self, sandbox_id: str) -> None:
        """Run in a background task beside the admission; never raises (its error is
        raised by :meth:`handle`)."""
        try:
            await self.pooled.greet(sandbox_id, unless_within_s=HELLO_FRESH_S)
            self._greeted = True
        except Exception as exc:
            self._error = exc
        finally:
            self._answered.set()

    async def handle(self) -> SandboxHandle:
        """The greeted sandbox; killed, and the greeting's error raised, if it failed."""
        self._taken = True
        try:
            if not self.started:  # no background task could be started: greet here
                self.started = True
                await self.greet(self.pooled.id)
            await self._answered.wait()
            if self._error is not None:
                raise self._error
            if not self._greeted:
                raise errors.AgentDisconnected("the pooled sandbox's greeting was cancelled")
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.pooled.kill()
            raise
        return self.pooled

    async def discard(self) -> None:
        """Kill the pooled sandbox unless the boot took it. Call shielded."""
        if not self._taken:
            self._taken = True
            await self.pooled.kill()


def _new_row(
    settings: Settings,
    spec: validation.Spec,
    sandbox_id: str,
    snapshot_id: str | None,
    tenant_id: str,
    ip_address: str | None,
) -> SandboxRow:
    now = utcnow()
    return SandboxRow(
        id=sandbox_id,
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
        work_dir=settings.vms_dir / sandbox_id,
        snapshot_id=snapshot_id,
        tenant_id=tenant_id,
        ip_address=ip_address,
    )


def tenant_getter(tenant_id: str) -> Callable[[Any], tenants.TenantRow | None]:
    return lambda conn: tenants.get_tenant(conn, tenant_id)


def usage_getter(tenant_id: str) -> Callable[[Any], tenants.Usage]:
    live = {state.value for state in LIVE_STATES}
    return lambda conn: tenants.usage(conn, tenant_id, live)


def _admission_facts(
    tenant_id: str,
) -> Callable[[Any], tuple[tenants.TenantRow | None, tenants.Usage, int]]:
    """The tenant, its usage and the server's live count: one trip to the store."""
    live_states = {state.value for state in LIVE_STATES}
    marks = ", ".join("?" * len(live_states))

    def read(conn: Any) -> tuple[tenants.TenantRow | None, tenants.Usage, int]:
        live = conn.execute(
            f"SELECT count(*) FROM sandboxes WHERE state IN ({marks})",  # noqa: S608
            tuple(live_states),
        ).fetchone()[0]
        usage = tenants.usage(conn, tenant_id, live_states)
        return tenants.get_tenant(conn, tenant_id), usage, int(live)

    return read


# States whose rows hold their ip_address (a paused sandbox gets its own back on resume).
_NETWORK_STATES = frozenset(
    {SandboxState.CREATING, SandboxState.RUNNING, SandboxState.PAUSED, SandboxState.STOPPING}
)


async def allocate_address(settings: Settings, store: Store, reserved: set[str]) -> str:
    """A free guest address of ``network_cidr``: none a live row or ``reserved`` holds.
    Call holding ``admission``."""
    rows = await store.list(states=_NETWORK_STATES)
    return netplan.allocate_address(settings, [*reserved, *(row.ip_address for row in rows)])


def network_plan(
    settings: Settings, policy: EgressPolicy | None, row: SandboxRow
) -> netplan.NetworkPlan | None:
    if policy is None or row.ip_address is None:
        return None
    return netplan.plan_for(settings, policy, row.ip_address)


async def recorded_plan(settings: Settings, sandbox_id: str) -> netplan.NetworkPlan | None:
    directory = netplan.net_dir(settings.data_dir)
    return await anyio.to_thread.run_sync(netplan.load, directory, sandbox_id)


def network_kwargs(plan: netplan.NetworkPlan | None) -> dict[str, Any]:
    """``network=plan`` for the factory / restorer, only when there is one (the
    SandboxFactory protocol's implementations need not know about networks otherwise)."""
    return {} if plan is None else {"network": plan}


def _failure_reason(exc: BaseException) -> str:
    if isinstance(exc, anyio.get_cancelled_exc_class()):
        return "creation was cancelled"
    if isinstance(exc, errors.EmberboxError):
        return f"boot failed: {exc.message}"
    return f"boot failed: {type(exc).__name__}: {exc}"
