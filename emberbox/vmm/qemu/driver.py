"""The QEMU driver: one QEMU process per sandbox, talking to the guest agent over virtio-serial.

Machine type follows the accelerator: ``microvm`` (ACPI, virtio-mmio) under KVM, where
it boots fastest; ``q35`` (virtio-pci) under TCG, where microvm hangs in about one boot
of three on these hosts while q35 boots every time. The root disk is a qcow2 overlay in
the VM's work dir backed by the image's ext4, so the image is never written.

Run as root, the server starts QEMU as an unprivileged user (``vmm_user``) that opens no
host path of ours: every file and socket is handed over as a descriptor
(:mod:`emberbox.vmm.qemu.files`, :mod:`emberbox.vmm.qemu.argv`). The driver starts,
restores and attaches to VMs; each running one is a :class:`~emberbox.vmm.qemu.vm.QemuVM`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path

from emberbox.errors import HostError, SnapshotCorrupt, SnapshotMismatch, VMMCrashed, VMMError
from emberbox.vmm import cgroups, vmm_user
from emberbox.vmm.base import SnapshotFiles, VMConfig
from emberbox.vmm.host import read_process
from emberbox.vmm.phases import Phases
from emberbox.vmm.qemu import files as qemu_files
from emberbox.vmm.qemu import migration
from emberbox.vmm.qemu.argv import MACHINE_REVISION, Accel, QemuPaths, build_argv
from emberbox.vmm.qemu.process import die_with_parent, spawn_janitor, without_huge_pages
from emberbox.vmm.qemu.vm import DISK_FILE, NAME, STATE_FILE, Incoming, QemuVM
from emberbox.vmm.vmm_user import VmmUser

log = logging.getLogger(__name__)
CPU_PERIOD_US = 100_000


@dataclass(frozen=True)
class HostLimits:
    """Host-side limits of each QEMU process (see emberbox.vmm.cgroups)."""

    memory_overhead_mib: int = 768  # on top of guest RAM: QEMU, its TCG cache, I/O
    pids_max: int = 512
    cpu_overhead: float = 0.5  # CPUs on top of one per vCPU: QEMU's I/O and main loop

    def cpu_quota_us(self, vcpus: int, period_us: int = CPU_PERIOD_US) -> int:
        """CPU time per ``period_us`` the VM's QEMU may use: (vCPUs + overhead) CPUs."""
        return max(1000, round((vcpus + self.cpu_overhead) * period_us))


def parse_version(text: str) -> str:
    match = re.search(r"version (\d+\.\d+(?:\.\d+)?)", text)
    if not match:
        raise HostError(f"cannot parse QEMU version from {text!r}")
    return match.group(1)


class QemuDriver:
    """Starts QEMU processes; one driver serves many VMs."""

    name = "qemu"

    def __init__(
        self,
        accel: Accel,
        binary: str = "qemu-system-x86_64",
        qemu_img: str = "qemu-img",
        limits: HostLimits | None = None,
        *,
        user: VmmUser | None = None,
        max_disk_mib: int | None = None,
    ) -> None:
        self.accel = accel
        self.binary = binary
        self.qemu_img = qemu_img
        self.limits = limits
        self.user = user  # run QEMU as this user (None: as ourselves)
        self.max_disk_mib = max_disk_mib  # None: the image's root filesystem size
        self._version: str | None = None

    def version(self) -> str:
        if self._version is None:
            path = shutil.which(self.binary)
            if path is None:
                raise HostError(f"{self.binary} not found: install the qemu-system-x86 package")
            out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
            self._version = parse_version(out.stdout)
        return self._version

    def state_version(self) -> str:
        """What a saved state needs of the VMM that loads it: QEMU's version and the
        machine's device set (recorded as snapshots' ``vmm_version``)."""
        return f"{self.version()}+m{MACHINE_REVISION}"

    def snapshot_key(self) -> str:
        return f"{NAME}-{self.state_version()}-{self.accel}"

    def check_host(self) -> None:
        """A clear HostError when QEMU is missing or its user cannot use KVM."""
        self.version()
        if self.accel == "kvm" and self.user is not None:
            vmm_user.check_kvm(self.user)

    async def start(self, config: VMConfig) -> QemuVM:
        self.check_host()
        phases = Phases()
        with phases.timed("disk overlay"):
            await qemu_files.make_overlay(
                self.qemu_img, config.work_dir, config.guest.rootfs, "raw"
            )
            self._check_disk(config)
        try:
            return self._spawn(config, phases=phases)
        except BaseException:
            shutil.rmtree(config.work_dir, ignore_errors=True)
            raise

    async def restore(
        self,
        config: VMConfig,
        snapshot: SnapshotFiles,
        *,
        adopt_disk: bool = False,
        prelaunched: QemuVM | None = None,
    ) -> QemuVM:
        """(See :meth:`Driver.restore`.) With ``prelaunched`` (made by :meth:`prelaunch`
        for this ``config`` and ``snapshot``), only the state is loaded into it, or,
        loaded already, its guest is run."""
        if prelaunched is None:
            vm = await self.prelaunch(config, snapshot, adopt_disk=adopt_disk)
        else:
            vm = prelaunched
            if vm.incoming is None or vm.config != config:
                await vm.kill()
                raise VMMError(f"VM {vm.vm_id} is not a prelaunched VM for {config.vm_id}")
            # Its start was before this restore: its phases are kept apart.
            vm.prepared_phases, vm.phases = vm.phases, Phases()
        assert vm.incoming is not None
        await self._load(vm, vm.incoming)
        return vm

    async def prelaunch(
        self,
        config: VMConfig,
        snapshot: SnapshotFiles,
        *,
        adopt_disk: bool = False,
        load_state: bool = False,
    ) -> QemuVM:
        """A QEMU for ``config`` that waits for ``snapshot``'s state (``-incoming
        defer``): its disk overlay made, the process started in its cgroup, QMP
        connected. The guest does not exist yet; :meth:`restore` with ``prelaunched``
        loads it. ``load_state``: load it now (a template's, saved stopped), leaving the
        guest paused, never run: the restore then only runs it. Kill it when it is not
        used."""
        self.check_host()
        if (snapshot.vmm, snapshot.vmm_version) != (NAME, self.state_version()):
            raise SnapshotMismatch(
                f"snapshot {snapshot.directory} was written by {snapshot.vmm} "
                f"{snapshot.vmm_version}; this is {NAME} {self.state_version()}",
                snapshot=str(snapshot.directory),
            )
        state, disk = snapshot.directory / STATE_FILE, snapshot.directory / DISK_FILE
        for path in (state, disk, *filter(None, [snapshot.memory_file])):
            if not path.is_file():
                raise SnapshotCorrupt(f"snapshot file {path} is missing", file=str(path))
        phases = Phases()
        with phases.timed("disk overlay"):
            if adopt_disk:
                qemu_files.make_work_dir(config.work_dir)
                qemu_files.adopt_disk(disk, QemuPaths(config.work_dir).overlay)  # + record
            else:
                await qemu_files.make_overlay(self.qemu_img, config.work_dir, disk, "qcow2")
            self._check_disk(config)
        # A clone maps the template's RAM file copy-on-write; the VM itself is no template.
        boot_config = replace(config, memory_file=snapshot.memory_file)
        # QEMU inherits the state file under the same number; our copy closes at once.
        state_fd = os.open(state, os.O_RDONLY)
        try:
            vm = self._spawn(config, boot=boot_config, pass_fds=(state_fd,), phases=phases)
        except BaseException:
            shutil.rmtree(config.work_dir, ignore_errors=True)
            raise
        finally:
            os.close(state_fd)
        vm.incoming = Incoming(state, state_fd, ignore_shared=snapshot.memory_file is not None)
        try:
            with vm.phases.timed("QMP connect"):
                qmp = await vm.qmp()
            await migration.set_ignore_shared(qmp, vm.incoming.ignore_shared)
            if load_state:
                await self._load_paused(vm, vm.incoming)
        except BaseException as exc:
            await self._fail_load(vm, state, exc)
            raise
        return vm

    async def _load_paused(self, vm: QemuVM, incoming: Incoming) -> None:
        qmp = await vm.qmp()
        with vm.phases.timed("migrate-incoming"):
            await migration.load_state(qmp, incoming.fd_number, timeout_s=300.0)
        if await migration.running(qmp):  # a state saved running: its guest ran already
            raise VMMError(f"snapshot {incoming.state} resumed by itself when loaded")
        vm.incoming = replace(incoming, loaded=True)

    def _check_disk(self, config: VMConfig) -> None:
        try:
            qemu_files.check_disk_cap(config, self.max_disk_mib)
        except BaseException:
            shutil.rmtree(config.work_dir, ignore_errors=True)
            raise

    async def _load(self, vm: QemuVM, incoming: Incoming) -> None:
        try:
            if incoming.loaded:  # seen paused when it was loaded
                with vm.phases.timed("resume"):
                    await (await vm.qmp()).execute("cont")
            else:
                with vm.phases.timed("migrate-incoming"):
                    await migration.load(await vm.qmp(), incoming.fd_number, timeout_s=300.0)
        except BaseException as exc:
            await self._fail_load(vm, incoming.state, exc)
            raise
        vm.incoming = None

    async def _fail_load(self, vm: QemuVM, state: Path, exc: BaseException) -> None:
        """Kill ``vm`` after its start or load failed; SnapshotCorrupt when QEMU itself
        gave up on the stream (it exits when a state does not load)."""
        if isinstance(exc, VMMError):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(vm.wait(), 2.0)
        alive, description = vm.is_running(), vm.exit_description()
        await vm.kill()
        if isinstance(exc, VMMError) and not alive:
            raise SnapshotCorrupt(
                f"could not load snapshot {state}: {description}", file=str(state)
            ) from exc

    def _spawn(
        self,
        config: VMConfig,
        *,
        boot: VMConfig | None = None,
        pass_fds: tuple[int, ...] = (),
        phases: Phases | None = None,
    ) -> QemuVM:
        """Open QEMU's files, start it (as the VMM user), put it in its cgroup.

        ``boot``: a restore's config, which waits for a saved state and maps a template's
        RAM file copy-on-write; without it, a VM with ``memory_file`` is a new template.
        """
        phases = phases if phases is not None else Phases()
        started = time.perf_counter()
        paths = QemuPaths(config.work_dir)
        ephemeral = config.lifetime == "ephemeral"
        user, incoming = self.user, boot is not None
        boot = boot or config
        files, fds = qemu_files.open_host_files(boot, shared=not incoming, user=user)
        try:
            argv = build_argv(
                self.binary, self.accel, boot, fds, incoming=incoming, shared=not incoming
            )
            clone = incoming and boot.memory_file is not None  # of a template
            no_thp = without_huge_pages() if clone else contextlib.nullcontext()
            with paths.vmm_log.open("wb") as log, no_thp:
                # Popen from the event loop's thread: PDEATHSIG fires when *that thread*
                # ends (set after the uid change, which would clear it).
                popen = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    cwd="/",
                    start_new_session=True,
                    pass_fds=(*files.pass_fds, *pass_fds, *filter(None, [boot.tap_fd])),
                    preexec_fn=die_with_parent if ephemeral else None,
                    user=user.uid if user else None,
                    group=user.gid if user else None,
                    extra_groups=list(user.groups) if user else None,
                )
        except PermissionError as exc:  # e.g. no CAP_SETUID in a container
            who = f" as {user.name!r} (EMBERBOX_VMM_USER)" if user else ""
            raise HostError(f"cannot start {self.binary}{who}: {exc}") from exc
        finally:
            files.close()  # QEMU holds its own copies now
        phases.add("QEMU spawn", (time.perf_counter() - started) * 1000)
        with phases.timed("host cgroup"):
            cgroup = self._limit(config, popen.pid)
        dirs = cgroup.dirs if cgroup is not None else ()
        with phases.timed("janitor spawn"):
            janitor = spawn_janitor(popen.pid, config.work_dir, dirs) if ephemeral else None
        vm = QemuVM(config, popen.pid, popen, janitor, self.state_version(), cgroup)
        vm.phases = phases
        return vm

    def _limit(self, config: VMConfig, pid: int) -> cgroups.HostCgroup | None:
        """Put QEMU in its own host cgroup (guest RAM + overhead, pids, CPU), if configured."""
        if self.limits is None:
            return None
        memory = (config.memory_mib + self.limits.memory_overhead_mib) << 20
        cpu = cgroups.CpuQuota(self.limits.cpu_quota_us(config.vcpus), CPU_PERIOD_US)
        cgroup = cgroups.create(config.vm_id, memory, self.limits.pids_max, cpu=cpu)
        if cgroup is None:
            return None
        try:
            cgroup.add(pid)
        except OSError as exc:
            log.warning("VM %s runs without host-side limits: %s", config.vm_id, exc)
            with contextlib.suppress(OSError):
                cgroup.remove()
            return None
        return cgroup

    async def attach(self, config: VMConfig, pid: int) -> QemuVM:
        info = read_process(pid)
        if info is None or str(config.work_dir) not in " ".join(info.args):
            raise VMMCrashed(f"no QEMU process {pid} for {config.work_dir}")
        existing = cgroups.existing(config.vm_id)
        return QemuVM(config, pid, None, None, self.state_version(), existing)
