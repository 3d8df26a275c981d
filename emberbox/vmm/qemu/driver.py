"""The QEMU driver: one QEMU process per sandbox, talking to the guest agent over virtio-serial.

Machine type follows the accelerator: ``microvm`` (ACPI, virtio-mmio) under KVM, where
it boots fastest; ``q35`` (virtio-pci) under TCG, where microvm hangs in about one boot
of three on these hosts while q35 boots every time. The root disk is a qcow2 overlay in
the VM's work dir backed by the image's ext4, so the image is never written.

Run as root, the server starts QEMU as an unprivileged user (``vmm_user``) that opens no
host path of ours: every file and socket is handed over as a descriptor
(:mod:`emberbox.vmm.qemu.files`, :mod:`emberbox.vmm.qemu.argv`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path

from emberbox.errors import HostError, SnapshotCorrupt, SnapshotMismatch, VMMCrashed, VMMError
from emberbox.vmm import cgroups, vmm_user
from emberbox.vmm.base import AgentStream, SnapshotFiles, VMConfig
from emberbox.vmm.console import ConsoleLog
from emberbox.vmm.host import read_process
from emberbox.vmm.qemu import files as qemu_files
from emberbox.vmm.qemu import migration
from emberbox.vmm.qemu.argv import Accel, QemuPaths, build_argv
from emberbox.vmm.qemu.process import (
    die_with_parent,
    reap_in_background,
    spawn_janitor,
    wait_for_exit,
)
from emberbox.vmm.qemu.qmp import QMPClient
from emberbox.vmm.vmm_user import VmmUser

NAME = "qemu"
log = logging.getLogger(__name__)
STATE_FILE = "state"  # in a snapshot directory: device state (+ RAM unless a template)
DISK_FILE = "disk.qcow2"  # in a snapshot directory: the disk as it was
QMP_TIMEOUT_S = 10.0
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


class QemuVM:
    """A running QEMU process and everything in its work dir."""

    def __init__(
        self,
        config: VMConfig,
        pid: int,
        popen: subprocess.Popen[bytes] | None,
        janitor: subprocess.Popen[bytes] | None,
        vmm_version: str = "",
        cgroup: cgroups.HostCgroup | None = None,
    ) -> None:
        self.config = config
        self.vmm_version = vmm_version
        self.cgroup = cgroup
        self.paths = QemuPaths(config.work_dir)
        self._pid = pid
        self._popen = popen
        self._janitor = janitor
        self._killed = False
        self._qmp: QMPClient | None = None
        self.save_timeout_s = 300.0
        self.console = ConsoleLog(
            self.paths.console, self.paths.console_log, config.console_log_max_bytes
        )
        self.console.start()

    @property
    def vm_id(self) -> str:
        return self.config.vm_id

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def work_dir(self) -> Path:
        return self.config.work_dir

    def is_running(self) -> bool:
        if self._popen is not None:
            return self._popen.poll() is None
        return read_process(self._pid) is not None

    def exit_description(self) -> str:
        code = self._popen.poll() if self._popen is not None else None
        stderr = ""
        with contextlib.suppress(OSError):
            stderr = self.paths.vmm_log.read_text(errors="replace")[-2000:].strip()
        desc = f"QEMU (pid {self._pid}) exited" + (
            f" with status {code}" if code is not None else ""
        )
        return f"{desc}: {stderr}" if stderr else desc

    async def open_agent_stream(self, timeout_s: float) -> AgentStream:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            try:
                return await asyncio.open_unix_connection(str(self.paths.agent), limit=1 << 22)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                if not self.is_running():
                    raise VMMCrashed(self.exit_description(), self.console_tail()) from exc
                if loop.time() > deadline:
                    raise VMMError(
                        f"agent socket not available: {exc}", self.console_tail()
                    ) from exc
                await asyncio.sleep(0.01)

    def console_tail(self, max_bytes: int = 8192) -> str:
        return self.console.tail(max_bytes)

    async def qmp(self) -> QMPClient:
        """This VM's QMP session, opened on first use."""
        if self._qmp is None:
            try:
                self._qmp = await QMPClient.connect(self.paths.qmp, QMP_TIMEOUT_S)
            except VMMError as exc:
                if not self.is_running():
                    raise VMMCrashed(self.exit_description(), self.console_tail()) from exc
                raise
        return self._qmp

    async def pause(self) -> None:
        await (await self.qmp()).execute("stop")

    async def resume(self) -> None:
        await (await self.qmp()).execute("cont")

    async def snapshot(self, dest: Path, *, stop: bool = False) -> SnapshotFiles:
        """(See :meth:`VM.snapshot`.) A template VM always stops: its RAM file *is* the
        snapshot, so the guest must never run on it again."""
        template = self.config.memory_file is not None
        stop = stop or template
        qmp = await self.qmp()
        was_running = (await qmp.execute("query-status")).get("running", False)
        os.mkdir(dest, 0o700)
        try:
            await qmp.execute("stop")
            await migration.save(
                qmp, dest / STATE_FILE, ignore_shared=template, timeout_s=self.save_timeout_s
            )
            if stop:
                # The state is safe on disk: end QEMU, then take its disk (no copy).
                self._terminate(remove_files=False)
                os.replace(self.paths.overlay, dest / DISK_FILE)
                shutil.rmtree(self.work_dir, ignore_errors=True)
                await self._close_qmp()
                await self.console.aclose()
            else:
                # Migration flushed the disk's metadata and left it inactive: copy it now,
                # while the guest cannot write, then let the guest run on.
                await asyncio.to_thread(shutil.copyfile, self.paths.overlay, dest / DISK_FILE)
                (dest / DISK_FILE).chmod(qemu_files.PRIVATE_FILE_MODE)
                if was_running:
                    await qmp.execute("cont")
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            if not self._killed and self.is_running() and was_running:
                with contextlib.suppress(VMMError, OSError):
                    await qmp.execute("cont")
            raise
        return SnapshotFiles(
            dest, NAME, self.vmm_version, self.config.memory_file if template else None
        )

    async def wait(self) -> int:
        if self.is_running():
            await wait_for_exit(self._pid)
        if self._popen is not None:
            return self._popen.wait()
        return -1

    async def kill(self) -> None:
        # Synchronous on purpose: nothing here awaits before the process is gone and the
        # files are removed, so a cancelled caller cannot leave half a VM behind.
        if not self._killed:
            self._terminate()
        await self._close_qmp()
        await self.console.aclose()

    async def release(self) -> None:
        await self._close_qmp()
        await self.console.aclose()
        if self._popen is not None and not self._killed:
            reap_in_background(self._popen)
            self._popen = None

    async def _close_qmp(self) -> None:
        qmp, self._qmp = self._qmp, None
        if qmp is not None:
            await qmp.aclose()

    def _terminate(self, *, remove_files: bool = True) -> None:
        self._killed = True
        if self._janitor is not None:
            with contextlib.suppress(ProcessLookupError):
                self._janitor.kill()
            self._janitor.wait()
            if self._janitor.stdin is not None:
                self._janitor.stdin.close()  # only now: its closing is the janitor's cue
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._pid, signal.SIGKILL)
        if self._popen is not None:
            self._popen.wait()
        else:
            deadline = time.monotonic() + 5
            while read_process(self._pid) is not None and time.monotonic() < deadline:
                time.sleep(0.005)
        if self.cgroup is not None:
            with contextlib.suppress(OSError):
                self.cgroup.remove()
        if remove_files:
            shutil.rmtree(self.work_dir, ignore_errors=True)


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

    def snapshot_key(self) -> str:
        return f"{NAME}-{self.version()}-{self.accel}"

    def check_host(self) -> None:
        """A clear HostError when QEMU is missing or its user cannot use KVM."""
        self.version()
        if self.accel == "kvm" and self.user is not None:
            vmm_user.check_kvm(self.user)

    async def start(self, config: VMConfig) -> QemuVM:
        self.check_host()
        await qemu_files.make_overlay(self.qemu_img, config.work_dir, config.guest.rootfs, "raw")
        self._check_disk(config)
        try:
            return self._spawn(config)
        except BaseException:
            shutil.rmtree(config.work_dir, ignore_errors=True)
            raise

    async def restore(
        self, config: VMConfig, snapshot: SnapshotFiles, *, adopt_disk: bool = False
    ) -> QemuVM:
        self.check_host()
        if (snapshot.vmm, snapshot.vmm_version) != (NAME, self.version()):
            raise SnapshotMismatch(
                f"snapshot {snapshot.directory} was written by {snapshot.vmm} "
                f"{snapshot.vmm_version}; this is {NAME} {self.version()}",
                snapshot=str(snapshot.directory),
            )
        state, disk = snapshot.directory / STATE_FILE, snapshot.directory / DISK_FILE
        for path in (state, disk, *filter(None, [snapshot.memory_file])):
            if not path.is_file():
                raise SnapshotCorrupt(f"snapshot file {path} is missing", file=str(path))
        if adopt_disk:
            qemu_files.make_work_dir(config.work_dir)
            os.link(disk, QemuPaths(config.work_dir).overlay)  # the snapshot keeps its name
        else:
            await qemu_files.make_overlay(self.qemu_img, config.work_dir, disk, "qcow2")
        self._check_disk(config)
        # A clone maps the template's RAM file copy-on-write; the VM itself is no template.
        boot_config = replace(config, memory_file=snapshot.memory_file)
        state_fd = os.open(state, os.O_RDONLY)  # inherited by QEMU under the same number
        try:
            vm = self._spawn(config, boot=boot_config, pass_fds=(state_fd,))
            await self._load(vm, state, state_fd, ignore_shared=snapshot.memory_file is not None)
        except BaseException:
            shutil.rmtree(config.work_dir, ignore_errors=True)
            raise
        finally:
            os.close(state_fd)
        return vm

    def _check_disk(self, config: VMConfig) -> None:
        try:
            qemu_files.check_disk_cap(config, self.max_disk_mib)
        except BaseException:
            shutil.rmtree(config.work_dir, ignore_errors=True)
            raise

    async def _load(self, vm: QemuVM, state: Path, state_fd: int, *, ignore_shared: bool) -> None:
        try:
            qmp = await vm.qmp()
            await migration.load(qmp, state_fd, ignore_shared=ignore_shared, timeout_s=300.0)
        except BaseException as exc:
            if isinstance(exc, VMMError):  # QEMU exits when a stream does not load
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(vm.wait(), 2.0)
            alive, description = vm.is_running(), vm.exit_description()
            await vm.kill()
            if isinstance(exc, VMMError) and not alive:
                raise SnapshotCorrupt(
                    f"could not load snapshot {state}: {description}", file=str(state)
                ) from exc
            raise

    def _spawn(
        self, config: VMConfig, *, boot: VMConfig | None = None, pass_fds: tuple[int, ...] = ()
    ) -> QemuVM:
        """Open QEMU's files, start it (as the VMM user), put it in its cgroup.

        ``boot``: a restore's config, which waits for a saved state and maps a template's
        RAM file copy-on-write; without it, a VM with ``memory_file`` is a new template.
        """
        paths = QemuPaths(config.work_dir)
        ephemeral = config.lifetime == "ephemeral"
        user, incoming = self.user, boot is not None
        boot = boot or config
        files, fds = qemu_files.open_host_files(boot, shared=not incoming, user=user)
        try:
            argv = build_argv(
                self.binary, self.accel, boot, fds, incoming=incoming, shared=not incoming
            )
            with paths.vmm_log.open("wb") as log:
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
        cgroup = self._limit(config, popen.pid)
        dirs = cgroup.dirs if cgroup is not None else ()
        janitor = spawn_janitor(popen.pid, config.work_dir, dirs) if ephemeral else None
        return QemuVM(config, popen.pid, popen, janitor, self.version(), cgroup)

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
        return QemuVM(config, pid, None, None, self.version(), cgroups.existing(config.vm_id))
