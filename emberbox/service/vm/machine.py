"""The library API: a running microVM with its guest agent connected.

    async with SandboxVM.boot(image="default", vcpus=1, memory_mib=512) as sb:
        result = await sb.agent.exec(ExecSpec(["python3", "-c", "print(6*7)"]))
        pid = await sb.agent.spawn(SpawnSpec("python3 -m http.server 8000"))  # background
        await sb.agent.write_file("/tmp/data.bin", b"...")        # a path in the guest

``boot()`` returns only after the agent's handshake and kills the VM on exit. The
service layer uses :meth:`SandboxVM.start` with ``lifetime="detached"`` so that VMs
outlive a server restart, and :meth:`SandboxVM.attach` to adopt them again.

The agent's calls (exec, processes, files) are those of ``sb.agent``, an
:class:`~emberbox.agent_client.client.AgentClient`; the network wiring is
:mod:`~emberbox.service.vm.network`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

from emberbox.agent_client.client import AgentClient, HelloInfo
from emberbox.config import Settings
from emberbox.errors import AgentError, HostError, InvalidRequest
from emberbox.images.registry import ImageInfo, ImageRegistry
from emberbox.net import host as nethost
from emberbox.net import plan as netplan
from emberbox.net.plan import NetworkPlan
from emberbox.service.vm.boot import boot_until_ready, connect_agent
from emberbox.service.vm.network import configure_guest, network_down, network_up
from emberbox.vmm.base import VM, Driver, Lifetime, Prelaunching, SnapshotFiles, VMConfig
from emberbox.vmm.host import UNIX_PATH_MAX, socket_path_fits
from emberbox.vmm.phases import Phases, phases_of
from emberbox.vmm.select import choose_driver


def new_sandbox_id() -> str:
    return secrets.token_hex(8)


def check_shape(settings: Settings, vcpus: int, memory_mib: int) -> None:
    if not 1 <= vcpus <= settings.max_vcpus:
        raise InvalidRequest(f"vcpus must be between 1 and {settings.max_vcpus}, got {vcpus}")
    if not 64 <= memory_mib <= settings.max_memory_mib:
        raise InvalidRequest(
            f"memory_mib must be between 64 and {settings.max_memory_mib}, got {memory_mib}"
        )


def work_dir_for(settings: Settings, sandbox_id: str) -> Path:
    work_dir = settings.vms_dir / sandbox_id
    longest = work_dir / "console.sock"
    if not socket_path_fits(longest):
        raise HostError(
            f"data dir {settings.data_dir} is too deep: socket path {longest} exceeds "
            f"{UNIX_PATH_MAX} bytes; set EMBERBOX_DATA_DIR to a shorter path"
        )
    return work_dir


class SandboxVM:
    """One microVM and its agent connection (``agent``: exec, processes, files); kill
    it (or use ``boot()``) when done."""

    def __init__(
        self,
        sandbox_id: str,
        image: str,
        vm: VM,
        agent: AgentClient,
        hello: HelloInfo,
        vcpus: int,
        memory_mib: int,
        network: nethost.NetNamespace | None = None,
    ) -> None:
        self.id = sandbox_id
        self.image = image
        self.vm = vm
        self.agent = agent
        self.hello = hello
        self.vcpus = vcpus
        self.memory_mib = memory_mib
        self.network = network  # None: no network (the NIC leads nowhere)
        # Where it came from, for the create metrics: "cold" (booted) until a launcher
        # says otherwise ("template": restored from the image's template snapshot).
        self.origin = "cold"
        # Where its start went (the driver's phases, then ours); the bench reads it.
        self.phases = Phases()
        self.prepared_phases: Phases | None = None  # a pooled VM's, before its hand-out
        self.greeted_at = time.monotonic()  # made right after its hello

    @property
    def ip_address(self) -> str | None:
        return self.network.plan.slot.guest if self.network else None

    @property
    def pid(self) -> int | None:
        return self.vm.pid

    @property
    def work_dir(self) -> Path:
        return self.vm.work_dir

    @classmethod
    async def start(
        cls,
        settings: Settings,
        *,
        image: str | None = None,
        vcpus: int | None = None,
        memory_mib: int | None = None,
        sandbox_id: str | None = None,
        lifetime: Lifetime = "ephemeral",
        driver: Driver | None = None,
        network: NetworkPlan | None = None,
    ) -> SandboxVM:
        """Boot a sandbox and return once its agent has answered the handshake.

        With ``network`` it gets its own namespace, TAP and egress rules (see
        docs/networking.md); without, its NIC leads nowhere.
        Raises ImageNotFound, InvalidRequest, HostError, BootTimeout or VMMCrashed.
        """
        vcpus = vcpus or settings.default_vcpus
        memory_mib = memory_mib or settings.default_memory_mib
        check_shape(settings, vcpus, memory_mib)
        info = ImageRegistry(settings).get(image or settings.default_image)
        sandbox_id = sandbox_id or new_sandbox_id()
        if driver is None:
            driver = choose_driver(settings, info.files).driver
        phases = Phases()
        with phases.timed("network (host)"):
            ns = await network_up(settings, driver, sandbox_id, network)
        try:
            config = vm_config(settings, info, sandbox_id, vcpus, memory_mib, lifetime, ns)
            ready = await boot_until_ready(
                lambda: driver.start(config),
                timeout_s=settings.boot_timeout_s,
                attempts=settings.boot_attempts,
                hostname=_hostname(sandbox_id),
                sandbox_id=sandbox_id,
            )
            phases.merge(phases_of(ready.vm))
            phases.add("boot to agent hello", ready.boot_ms)
            if ns is not None:
                try:
                    with phases.timed("network (guest)"):
                        await configure_guest(ready.agent, network)
                except BaseException:
                    await ready.agent.aclose()
                    await ready.vm.kill()
                    raise
        except BaseException:
            await network_down(ns)
            raise
        finally:
            if ns is not None:
                ns.close_tap()
        sandbox = cls(
            sandbox_id, info.name, ready.vm, ready.agent, ready.hello, vcpus, memory_mib, ns
        )
        sandbox.phases = phases
        return sandbox

    @classmethod
    async def restore(
        cls,
        settings: Settings,
        snapshot: SnapshotFiles,
        *,
        image: str,
        vcpus: int,
        memory_mib: int,
        sandbox_id: str | None = None,
        lifetime: Lifetime = "ephemeral",
        driver: Driver | None = None,
        adopt_disk: bool = False,
        timeout_s: float | None = None,
        network: NetworkPlan | None = None,
        reset_network: bool = True,
        prelaunched: VM | None = None,
    ) -> SandboxVM:
        """Start a sandbox from ``snapshot`` (made by a VM of this image and shape) and
        return once its agent answered a fresh hello: new entropy (RNG reseeded), the
        wall clock, hostname and sandbox id, so that no two restores are alike.

        Raises SnapshotMismatch, SnapshotCorrupt, or the agent's error; no retry: a
        snapshot that does not come up once will not the second time.

        The guest's NIC is set up for ``network``, or taken down without one (the
        snapshot may be of a sandbox that had a network; ``reset_network=False`` skips
        that for a template, whose NIC was never up, and a resumed sandbox without a
        network never had one).

        ``prelaunched``: a VMM the driver started ahead for exactly this sandbox
        (:mod:`~emberbox.service.vm.spares`, no network), which only loads the state.
        """
        check_shape(settings, vcpus, memory_mib)
        info = ImageRegistry(settings).get(image)
        sandbox_id = sandbox_id or new_sandbox_id()
        if driver is None:
            driver = choose_driver(settings, info.files).driver
        phases = Phases()
        with phases.timed("network (host)"):
            ns = await network_up(settings, driver, sandbox_id, network, keep_record=adopt_disk)
        try:
            config = vm_config(settings, info, sandbox_id, vcpus, memory_mib, lifetime, ns)
            if prelaunched is not None and isinstance(driver, Prelaunching):
                vm = await driver.restore(
                    config, snapshot, adopt_disk=adopt_disk, prelaunched=prelaunched
                )
            else:
                vm = await driver.restore(config, snapshot, adopt_disk=adopt_disk)
            phases.merge(phases_of(vm))
            try:
                with phases.timed("agent hello"):
                    agent, hello = await connect_agent(
                        vm,
                        timeout_s=timeout_s or min(settings.boot_timeout_s, 15.0),
                        hostname=_hostname(sandbox_id),
                        sandbox_id=sandbox_id,
                    )
                # A resumed sandbox (adopt_disk) had a network exactly when it gets a
                # plan back: without one there is nothing of an earlier network to undo.
                if network is not None or (reset_network and not adopt_disk):
                    with phases.timed("network (guest)"):
                        await configure_guest(agent, network)
            except BaseException:
                await vm.kill()
                raise
        except BaseException:
            if prelaunched is not None:  # idempotent: also when the restore killed it
                await prelaunched.kill()
            # A paused sandbox (adopt_disk) keeps its record for the next resume.
            await network_down(ns, keep_record=adopt_disk)
            raise
        finally:
            if ns is not None:
                ns.close_tap()
        sandbox = cls(sandbox_id, info.name, vm, agent, hello, vcpus, memory_mib, ns)
        sandbox.phases = phases
        if prelaunched is not None:  # its start, before the create: the bench shows it apart
            sandbox.prepared_phases = phases_of(_Prepared(vm))
        return sandbox

    @classmethod
    @contextlib.asynccontextmanager
    async def boot(
        cls,
        image: str | None = None,
        vcpus: int | None = None,
        memory_mib: int | None = None,
        *,
        settings: Settings | None = None,
    ) -> AsyncIterator[SandboxVM]:
        """An ephemeral sandbox for the duration of an ``async with`` block."""
        sandbox = await cls.start(
            settings or Settings(), image=image, vcpus=vcpus, memory_mib=memory_mib
        )
        try:
            yield sandbox
        finally:
            await sandbox.kill()

    @classmethod
    async def attach(
        cls,
        settings: Settings,
        *,
        sandbox_id: str,
        pid: int,
        image: str,
        vcpus: int,
        memory_mib: int,
        driver: Driver | None = None,
    ) -> SandboxVM:
        """Adopt a detached VM left running by an earlier process and reconnect its agent."""
        info = ImageRegistry(settings).get(image)
        config = vm_config(settings, info, sandbox_id, vcpus, memory_mib, "detached")
        if driver is None:
            driver = choose_driver(settings, info.files).driver
        vm = await driver.attach(config, pid)
        try:
            agent, hello = await connect_agent(
                vm,
                timeout_s=min(settings.boot_timeout_s, 15.0),
                hostname=_hostname(sandbox_id),
                sandbox_id=sandbox_id,
            )
        except BaseException:
            await vm.kill()
            raise
        # Its namespace outlived the old server; the record says what to remove later.
        plan = netplan.load(netplan.net_dir(settings.data_dir), sandbox_id)
        ns = None
        if plan is not None:
            ns = nethost.NetNamespace(sandbox_id, plan, netplan.net_dir(settings.data_dir))
        return cls(sandbox_id, image, vm, agent, hello, vcpus, memory_mib, ns)

    def is_running(self) -> bool:
        return self.vm.is_running() and not self.agent.closed

    def end_reason(self) -> str | None:
        """Why it stopped running, when we know better than "the VMM exited"."""
        return self.agent.violation

    async def snapshot(self, dest: Path, *, stop: bool = False) -> SnapshotFiles:
        """Save the VM into the new directory ``dest`` (see :meth:`VM.snapshot`); with
        ``stop`` the VM ends afterwards and this sandbox is done with."""
        if stop:
            await self.agent.aclose()
        files = await self.vm.snapshot(dest, stop=stop)
        if not stop:
            await self._reconnect_if_lost()
        else:  # paused: the network is made again on resume, from its record
            ns, self.network = self.network, None
            await network_down(ns, keep_record=True)
        return files

    async def greet(self, sandbox_id: str, *, unless_within_s: float = 0.0) -> HelloInfo:
        """Say hello again (fresh entropy, clock, hostname, id): a pooled sandbox handed
        out as ``sandbox_id`` (which must be the id it was started with).

        Not said when the last hello is less than ``unless_within_s`` old: that hello
        gave this VM its own entropy (no other VM shares its RNG state), its hostname and
        id (the same), and a clock that has run since; only our own ``true`` ran in it.
        """
        if sandbox_id != self.id:
            raise InvalidRequest(f"sandbox {self.id} cannot be renamed to {sandbox_id}")
        # From here on its phases are the hand-out's; how it was made stays readable
        # (a prelaunched VMM's start first).
        prepared = Phases()
        prepared.merge(self.prepared_phases)
        prepared.merge(self.phases)
        self.prepared_phases, self.phases = prepared, Phases()
        if time.monotonic() - self.greeted_at < unless_within_s:
            return self.hello
        with self.phases.timed("hand-out hello"):
            self.hello = await self.agent.handshake(
                timeout_s=10.0, hostname=_hostname(sandbox_id), sandbox_id=sandbox_id
            )
        self.greeted_at = time.monotonic()
        return self.hello

    async def _reconnect_if_lost(self) -> None:
        """Some VMMs (Firecracker) reset the agent transport while snapshotting."""
        try:
            await asyncio.wait_for(self.agent.ping(), 2.0)
            return
        except (TimeoutError, AgentError):
            await self.agent.aclose()
        self.agent, self.hello = await connect_agent(
            self.vm, timeout_s=15.0, hostname=_hostname(self.id), sandbox_id=self.id
        )

    async def kill(self) -> None:
        """End the VM and remove its files and network. Idempotent."""
        try:
            await self.agent.aclose()
        finally:
            try:
                await self.vm.kill()
            finally:
                await network_down(self.network)

    async def detach(self) -> None:
        """Drop the agent connection but leave the VM running (server shutdown)."""
        try:
            await self.agent.aclose()
        finally:
            await self.vm.release()


class _Prepared:
    """A VM's ``prepared_phases`` (a prelaunched VMM's start) seen as ``phases``."""

    def __init__(self, vm: object) -> None:
        self.phases = getattr(vm, "prepared_phases", None)


def _hostname(sandbox_id: str) -> str:
    return f"emberbox-{sandbox_id[:12]}"


def vm_config(
    settings: Settings,
    info: ImageInfo,
    sandbox_id: str,
    vcpus: int,
    memory_mib: int,
    lifetime: Lifetime,
    network: nethost.NetNamespace | None = None,
) -> VMConfig:
    return VMConfig(
        vm_id=sandbox_id,
        work_dir=work_dir_for(settings, sandbox_id),
        guest=info.files,
        vcpus=vcpus,
        memory_mib=memory_mib,
        console_log_max_bytes=settings.console_log_max_bytes,
        lifetime=lifetime,
        tap_fd=network.tap_fd if network is not None else None,
        disk_roots=disk_roots(settings),
    )


def disk_roots(settings: Settings) -> tuple[Path, ...]:
    """Where a VM's disk layers may be: the data dir, the image and template caches."""
    dirs = (settings.data_dir, settings.cache_dir, settings.images_dir)
    return tuple(Path(os.path.realpath(d)) for d in dirs)


__all__ = ["SandboxVM", "check_shape", "new_sandbox_id", "vm_config", "work_dir_for"]
