"""The Firecracker driver: one ``firecracker`` process per VM, configured over its API socket.

The driver is split by concern: :mod:`~emberbox.vmm.firecracker.api` builds every API payload
(pure), :mod:`~emberbox.vmm.firecracker.files` places and removes a VM's files (its layout is
drawn there), :mod:`~emberbox.vmm.firecracker.process` spawns, adopts and waits for the process,
:mod:`~emberbox.vmm.firecracker.vsock` reaches the guest agent,
:mod:`~emberbox.vmm.firecracker.jailer` builds jails. This module holds the VM handle and
the driver that tie them together.

Disks: the image's rootfs is attached read-only and shared by every VM; each VM writes
to a small sparse scratch drive of its own, which the guest's init lays over the rootfs
as an overlayfs (``emberbox.overlay=/dev/vdb`` on the kernel command line). So a start
copies nothing (a link to the rootfs, a fresh empty ext4 of about a megabyte) and a
snapshot copies only what the guest wrote (docs/firecracker.md).

Snapshots and disk paths: Firecracker records the drive's ``path_on_host`` (and the vsock
``uds_path``) inside the snapshot and reopens them on load; the load API can override
the vsock path and TAP names, but not drive paths. So both are given *relative* to the
process's working directory, and a restored VM gets a fresh process running in its own
directory with the same names: a link to the same rootfs, a copy of the snapshot's
scratch. This is also how paths work in a jail, so plain and jailed VMs share one scheme.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

from emberbox.errors import HostError, SnapshotCorrupt, SnapshotMismatch, VMMCrashed, VMMError
from emberbox.guest.protocol import AGENT_VSOCK_PORT
from emberbox.vmm.base import AgentStream, SnapshotFiles, VMConfig
from emberbox.vmm.firecracker import api as fc_api
from emberbox.vmm.firecracker import jailer
from emberbox.vmm.firecracker.api import ApiRequest, BootPlan
from emberbox.vmm.firecracker.client import ApiClient
from emberbox.vmm.firecracker.files import (
    FC_LOG,
    METRICS,
    ROOTFS,
    SCRATCH,
    SNAPSHOT_BASE,
    SNAPSHOT_MEMORY,
    SNAPSHOT_STATE,
    VSOCK,
    Layout,
    check_base_record,
    clone_file,
    hand_over,
    layout_for,
    link_base,
    make_dirs,
    make_scratch,
    private_dir,
    remove_vm_files,
    require_files,
    write_base_record,
)
from emberbox.vmm.firecracker.jailer import JailerConfig
from emberbox.vmm.firecracker.process import (
    Adopted,
    Child,
    VMMProcess,
    cmdline_matches,
    read_tail,
    spawn_firecracker,
    trim_log,
    wait_exit,
)
from emberbox.vmm.firecracker.vsock import connect_vsock
from emberbox.vmm.host import kvm_device_usable, read_process

NAME = "firecracker"
GUEST_CID = 3
SCRATCH_MIB = 2048  # what a VM can write over its image (sparse: costs what it holds)
CONSOLE_TRIM_S = 1.0  # the console file passes its cap by at most what a second brings


def firecracker_usable(binary: str = NAME) -> tuple[bool, str]:
    """Whether Firecracker can run VMs here, and why not: binary present, KVM openable."""
    if shutil.which(binary) is None:
        return False, f"no Firecracker binary {binary!r} on PATH"
    kvm = kvm_device_usable()
    if not kvm.usable:
        return False, kvm.reason
    return True, "Firecracker binary found and /dev/kvm usable"


class FirecrackerVM:
    """A running Firecracker process and the API client that steers it."""

    def __init__(
        self,
        vm_id: str,
        layout: Layout,
        process: VMMProcess,
        *,
        base: Path | None,
        version: Callable[[], str],
        console_max_bytes: int,
        api_timeout_s: float,
        snapshot_timeout_s: float,
    ) -> None:
        self._vm_id = vm_id
        self._layout = layout
        self._process = process
        # The shared read-only rootfs under this VM's scratch drive; None for a VM restored
        # from a snapshot made before the overlay, whose rootfs.ext4 is its own copy.
        self._base = base
        self._version = version
        self._console_max = console_max_bytes
        self._snapshot_timeout_s = snapshot_timeout_s
        self._paused = False
        self.api = ApiClient(layout.api_socket, process, self.console_tail, timeout_s=api_timeout_s)
        # Firecracker appends the console to a file itself: trim it all along, not only
        # when read, so that a guest printing forever cannot fill the host's disk.
        self._trimmer = asyncio.get_running_loop().create_task(self._trim_console())

    async def _trim_console(self) -> None:
        while self._process.poll() is None:
            await asyncio.to_thread(trim_log, self._layout.console, self._console_max)
            await asyncio.sleep(CONSOLE_TRIM_S)

    @property
    def vm_id(self) -> str:
        return self._vm_id

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def work_dir(self) -> Path:
        return self._layout.work_dir

    def is_running(self) -> bool:
        return self._process.poll() is None

    def console_tail(self, max_bytes: int = 8192) -> str:
        trim_log(self._layout.console, self._console_max)
        return read_tail(self._layout.console, max_bytes)

    async def open_agent_stream(self, timeout_s: float) -> AgentStream:
        return await connect_vsock(
            self._layout.root / VSOCK,
            AGENT_VSOCK_PORT,
            timeout_s,
            is_running=self.is_running,
            console_tail=self.console_tail,
        )

    async def pause(self) -> None:
        await self.api.request(ApiRequest("PATCH", "/vm", fc_api.vm_state_payload("Paused")))
        self._paused = True

    async def resume(self) -> None:
        await self.api.request(ApiRequest("PATCH", "/vm", fc_api.vm_state_payload("Resumed")))
        self._paused = False

    async def snapshot(self, dest: Path, *, stop: bool = False) -> SnapshotFiles:
        """Write ``vmstate``, ``memory``, ``scratch.ext4`` and ``base.json`` into ``dest``
        (the shared rootfs is not copied: a restore attaches it again).

        Firecracker resets the vsock transport while snapshotting: open agent streams end
        and must be reopened (the guest's listening socket survives). With ``stop`` the
        VMM is killed after the save (its files go with it; ``dest`` keeps its copy). On
        failure, the pause included, ``dest`` is removed and a VM paused here is resumed,
        ``stop`` or not.
        """
        version = self._version()  # before anything: with stop, a later failure loses the VM
        dest = private_dir(dest)
        paused_here = False
        try:
            if not self._paused:
                await self.pause()
                paused_here = True
            await self._write_snapshot(dest)
            # The disk is copied while paused, so it matches the memory image exactly.
            await asyncio.to_thread(self._save_disk, dest)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            if paused_here and self.is_running():
                with contextlib.suppress(VMMError):  # the snapshot's error is the news
                    await self.resume()
            raise
        if stop:
            await self.kill()
        elif paused_here and self.is_running():
            await self.resume()
        return SnapshotFiles(dest, NAME, version)

    def _save_disk(self, dest: Path) -> None:
        """What the guest wrote: its scratch (sparse: the size of the writes), and which
        rootfs it lies over; a VM without a scratch drive copies its whole rootfs."""
        if self._base is None:
            clone_file(self._layout.root / ROOTFS, dest / ROOTFS)
            return
        clone_file(self._layout.root / SCRATCH, dest / SCRATCH)
        write_base_record(dest, self._base)

    async def _write_snapshot(self, dest: Path) -> None:
        jail = self._layout.jail
        # A jailed Firecracker can only write inside its jail: stage there, then move out.
        staging = dest if jail is None else self._layout.root / "snapshot"
        seen_as = str(dest) if jail is None else "snapshot"
        if jail is not None:
            staging.mkdir(exist_ok=True)
            jailer.give_to_jail(jail[0], staging)
        payload = fc_api.snapshot_create_payload(
            f"{seen_as}/{SNAPSHOT_STATE}", f"{seen_as}/{SNAPSHOT_MEMORY}"
        )
        req = ApiRequest("PUT", "/snapshot/create", payload)
        await self.api.request(req, timeout_s=self._snapshot_timeout_s)
        if staging != dest:
            for name in (SNAPSHOT_STATE, SNAPSHOT_MEMORY):
                await asyncio.to_thread(shutil.move, staging / name, dest / name)

    async def wait(self) -> int:
        """The exit status; -1 for an adopted process (its status went to its parent)."""
        ticks = 0
        while (status := self._process.poll()) is None:
            ticks += 1
            if ticks % 20 == 0:  # every ~2 s: a chatty guest must not fill the disk
                trim_log(self._layout.console, self._console_max)
            await asyncio.sleep(0.1)
        return status

    async def kill(self) -> None:
        # Every step is idempotent, so a second call finishes what a cancelled one began.
        self._trimmer.cancel()
        self._process.kill()
        try:
            await self.api.aclose()
            await self._wait_gone(10.0)
        finally:
            remove_vm_files(self._layout)  # synchronous: runs even if the awaits were cancelled

    async def release(self) -> None:
        """Leave the VM running; a daemon thread reaps our child whenever it ends."""
        await self.api.aclose()
        if isinstance(self._process, Child):
            self._process.reap_in_background()

    async def _wait_gone(self, timeout_s: float) -> None:
        if not await wait_exit(self._process, timeout_s):
            raise VMMError(f"Firecracker pid {self.pid} survived SIGKILL for {timeout_s:g}s")


class FirecrackerDriver:
    """Boots, restores and re-adopts Firecracker VMs, optionally under the jailer."""

    name = NAME

    def __init__(
        self,
        binary: str = NAME,
        *,
        jailer: JailerConfig | None = None,
        socket_timeout_s: float = 5.0,
        api_timeout_s: float = 30.0,
        snapshot_timeout_s: float = 300.0,
        scratch_mib: int = SCRATCH_MIB,
        mkfs: str = "mkfs.ext4",
    ) -> None:
        self._binary = str(jailer.exec_file) if jailer is not None else binary
        self._scratch_mib = scratch_mib
        self._mkfs = mkfs
        self._jailer = jailer
        self._socket_timeout_s = socket_timeout_s
        self._api_timeout_s = api_timeout_s
        self._snapshot_timeout_s = snapshot_timeout_s
        self._version: str | None = None

    def version(self) -> str:
        if self._version is None:
            try:
                out = subprocess.run(
                    [self._binary, "--version"], capture_output=True, timeout=10, check=False
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise HostError(f"cannot run {self._binary} --version: {exc}") from exc
            self._version = fc_api.parse_version(out.stdout.decode(errors="replace"))
        return self._version

    def snapshot_key(self) -> str:
        return f"{NAME}-{self.version()}"

    async def start(self, config: VMConfig) -> FirecrackerVM:
        layout = layout_for(config, self._jailer)
        guest = config.guest
        require_files(guest.vmlinux, guest.initrd, guest.rootfs)
        jailed = layout.jail is not None
        plan = BootPlan(
            vcpus=config.vcpus,
            memory_mib=config.memory_mib,
            kernel="vmlinux" if jailed else str(guest.vmlinux.absolute()),
            initrd="initrd" if jailed else str(guest.initrd.absolute()),
            rootfs=ROOTFS,
            vsock_uds=VSOCK,
            log_file=FC_LOG,
            metrics_file=METRICS,
            kernel_args=config.kernel_args,
            guest_cid=GUEST_CID,
            scratch=SCRATCH,
        )
        requests = fc_api.boot_requests(plan)  # before any file is made: bad shapes fail fast

        async def place_files() -> None:
            # Nothing the size of the rootfs: a link to it, and an empty sparse scratch.
            link_base(guest.rootfs, layout.root / ROOTFS, jailed=jailed)
            await asyncio.to_thread(
                make_scratch, layout.root / SCRATCH, self._scratch_mib, self._mkfs
            )
            if jailed:
                jailer.link_or_copy(guest.vmlinux, layout.root / "vmlinux")
                jailer.link_or_copy(guest.initrd, layout.root / "initrd")
            hand_over(layout, SCRATCH, FC_LOG, METRICS)  # never the rootfs: it is the image's

        return await self._launch(config, layout, place_files, requests, base=guest.rootfs)

    async def restore(
        self, config: VMConfig, snapshot: SnapshotFiles, *, adopt_disk: bool = False
    ) -> FirecrackerVM:
        """Restore ``snapshot`` over ``config.guest.rootfs``, attached read-only again, with
        a copy of the snapshot's scratch (sparse, reflinked where the filesystem can; a
        snapshot made before the overlay has a whole rootfs copied instead). ``adopt_disk``
        changes nothing here: the snapshot is left whole either way.

        SnapshotMismatch for another VMM or version, or another rootfs than the snapshot
        was taken over; SnapshotCorrupt naming the file that is missing or that
        Firecracker could not load (the new VM is then gone).
        """
        if snapshot.vmm != NAME:
            raise SnapshotMismatch(
                f"snapshot was written by {snapshot.vmm!r}, not {NAME!r}",
                snapshot=str(snapshot.directory),
            )
        if snapshot.vmm_version != self.version():
            raise SnapshotMismatch(
                f"snapshot {snapshot.directory} was written by Firecracker "
                f"{snapshot.vmm_version}; this is Firecracker {self.version()}",
                snapshot=str(snapshot.directory),
            )
        src = snapshot.directory.absolute()
        overlay = (src / SCRATCH).exists() or (src / SNAPSHOT_BASE).exists()
        disks = (src / SCRATCH, src / SNAPSHOT_BASE) if overlay else (src / ROOTFS,)
        for path in (src / SNAPSHOT_STATE, src / SNAPSHOT_MEMORY, *disks):
            if not path.is_file():
                raise SnapshotCorrupt(f"snapshot file {path} is missing", file=str(path))
        base = config.guest.rootfs if overlay else None
        if base is not None:
            check_base_record(src, base)
        layout = layout_for(config, self._jailer)
        state, memory = str(src / SNAPSHOT_STATE), str(src / SNAPSHOT_MEMORY)
        if layout.jail is not None:
            state, memory = SNAPSHOT_STATE, SNAPSHOT_MEMORY

        async def place_files() -> None:
            # Same relative names as when the snapshot was taken: Firecracker reopens them.
            if base is None:
                await asyncio.to_thread(clone_file, src / ROOTFS, layout.root / ROOTFS)
                hand_over(layout, ROOTFS)
            else:
                link_base(base, layout.root / ROOTFS, jailed=layout.jail is not None)
                await asyncio.to_thread(clone_file, src / SCRATCH, layout.root / SCRATCH)
                hand_over(layout, SCRATCH)
            if layout.jail is not None:
                # Copies, not links: the jailed uid must own them; the snapshot stays shared.
                for name in (SNAPSHOT_STATE, SNAPSHOT_MEMORY):
                    await asyncio.to_thread(clone_file, src / name, layout.root / name)
                hand_over(layout, SNAPSHOT_STATE, SNAPSHOT_MEMORY)
            hand_over(layout, FC_LOG, METRICS)

        *setup, load = fc_api.restore_requests(FC_LOG, METRICS, state, memory)
        return await self._launch(
            config, layout, place_files, setup, load=(load, src / SNAPSHOT_STATE), base=base
        )

    async def attach(self, config: VMConfig, pid: int) -> FirecrackerVM:
        layout = layout_for(config, self._jailer)
        try:
            process = Adopted(pid)
            info = read_process(pid)
            if info is None:
                raise ProcessLookupError(pid)
            argv = list(info.args)
        except ProcessLookupError as exc:
            raise VMMCrashed(f"Firecracker pid {pid} of VM {config.vm_id} is gone") from exc
        jail_id = layout.jail[1] if layout.jail is not None else None
        if not cmdline_matches(argv, layout.api_socket_arg, jail_id) or process.poll() is not None:
            raise VMMCrashed(f"pid {pid} is not the Firecracker of VM {config.vm_id} any more")
        base = config.guest.rootfs if (layout.root / SCRATCH).exists() else None
        return self._vm(config, layout, process, base)

    async def _launch(
        self,
        config: VMConfig,
        layout: Layout,
        place_files: Callable[[], Awaitable[None]],
        requests: list[ApiRequest],
        load: tuple[ApiRequest, Path] | None = None,
        *,
        base: Path | None,
    ) -> FirecrackerVM:
        """Make the files, spawn, configure (then load ``load``: the request and the
        host's ``vmstate``); on any failure leave nothing behind."""
        vm: FirecrackerVM | None = None
        try:
            make_dirs(layout)
            await place_files()
            process = await spawn_firecracker(
                self._binary, self._jailer, config, layout, self._socket_timeout_s
            )
            vm = self._vm(config, layout, process, base)
            await vm.api.wait_ready(self._socket_timeout_s)
            for req in requests:
                await vm.api.request(req)
            if load is not None:
                await vm.api.load_snapshot(*load, timeout_s=self._snapshot_timeout_s)
        except BaseException:
            if vm is not None:
                await vm.kill()
            else:
                remove_vm_files(layout)
            raise
        return vm

    def _vm(
        self, config: VMConfig, layout: Layout, process: VMMProcess, base: Path | None
    ) -> FirecrackerVM:
        return FirecrackerVM(
            config.vm_id,
            layout,
            process,
            base=base,
            version=self.version,
            console_max_bytes=config.console_log_max_bytes,
            api_timeout_s=self._api_timeout_s,
            snapshot_timeout_s=self._snapshot_timeout_s,
        )
