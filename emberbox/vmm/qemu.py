"""The QEMU driver: one QEMU process per sandbox, talking to the guest agent over virtio-serial.

Machine type follows the accelerator: ``microvm`` (ACPI, virtio-mmio) under KVM, where
it boots fastest; ``q35`` (virtio-pci) under TCG, where microvm hangs in about one boot
of three on these hosts while q35 boots every time. The root disk is a qcow2 overlay in
the VM's work dir backed by the image's ext4, so the image is never written.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from emberbox.errors import HostError, SnapshotCorrupt, SnapshotMismatch, VMMCrashed, VMMError
from emberbox.guest.protocol import AGENT_PORT_NAME
from emberbox.vmm import cgroups, migration
from emberbox.vmm.base import AgentStream, SnapshotFiles, VMConfig
from emberbox.vmm.console import ConsoleLog
from emberbox.vmm.host import read_process
from emberbox.vmm.qmp import QMPClient

Accel = Literal["kvm", "tcg"]
PR_SET_PDEATHSIG = 1
NAME = "qemu"
log = logging.getLogger(__name__)
STATE_FILE = "state"  # in a snapshot directory: device state (+ RAM unless a template)
DISK_FILE = "disk.qcow2"  # in a snapshot directory: the disk as it was
QMP_TIMEOUT_S = 10.0
SECCOMP = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
# Skip hardware the guest would otherwise probe for (slow under emulation).
BASE_KERNEL_ARGS = (
    "console=ttyS0",
    "panic=-1",
    "quiet",
    "i8042.noaux",
    "i8042.nomux",
    "i8042.nopnp",
    "i8042.dumbkbd",
    "8250.nr_uarts=1",
)


@dataclass(frozen=True)
class HostLimits:
    """Host-side limits of each QEMU process (see emberbox.vmm.cgroups)."""

    memory_overhead_mib: int = 768  # on top of guest RAM: QEMU, its TCG cache, I/O
    pids_max: int = 512


@dataclass(frozen=True)
class QemuPaths:
    """Where a VM's sockets and files live inside its work dir."""

    work_dir: Path

    @property
    def qmp(self) -> Path:
        return self.work_dir / "qmp.sock"

    @property
    def agent(self) -> Path:
        return self.work_dir / "agent.sock"

    @property
    def console(self) -> Path:
        return self.work_dir / "console.sock"

    @property
    def console_log(self) -> Path:
        return self.work_dir / "console.log"

    @property
    def vmm_log(self) -> Path:
        return self.work_dir / "qemu.log"

    @property
    def overlay(self) -> Path:
        return self.work_dir / "overlay.qcow2"


def machine_args(accel: Accel) -> list[str]:
    """The ``-machine`` value followed by the ``-cpu`` option for ``accel``."""
    if accel == "kvm":
        machine = "microvm,accel=kvm,acpi=on,x-option-roms=off,pit=off,pic=off,rtc=on"
        return [machine, "-cpu", "host"]
    return ["q35,accel=tcg", "-cpu", "max"]


def device_args(accel: Accel) -> tuple[str, str]:
    """(block device, serial bus) model names for the machine type."""
    if accel == "kvm":
        return "virtio-blk-device", "virtio-serial-device"
    return "virtio-blk-pci", "virtio-serial-pci"


def kernel_cmdline(extra: tuple[str, ...] = ()) -> str:
    return " ".join((*BASE_KERNEL_ARGS, *extra))


def memory_args(config: VMConfig, *, shared: bool) -> list[str]:
    """Guest RAM as a backend named ``mem`` in every case, so that a snapshot of any VM
    can be loaded by any other with the same shape (RAM blocks are matched by name)."""
    size = f"size={config.memory_mib}M"
    if config.memory_file is None:
        backend = f"memory-backend-ram,id=mem,{size}"
    else:
        share = "on" if shared else "off"
        backend = f"memory-backend-file,id=mem,{size},mem-path={config.memory_file},share={share}"
    return ["-object", backend]


def build_argv(
    binary: str, accel: Accel, config: VMConfig, *, incoming: bool = False, shared: bool = True
) -> list[str]:
    """The QEMU command line for ``config`` (pure: no files touched).

    ``incoming``: wait for a saved state (``-incoming defer``) instead of booting.
    ``shared``: map ``config.memory_file`` shared (a template) or copy-on-write (a clone).
    """
    paths = QemuPaths(config.work_dir)
    blk, serial_bus = device_args(accel)
    machine, *cpu = machine_args(accel)
    return [
        binary,
        "-name", f"emberbox-{config.vm_id},process=emberbox-{config.vm_id}",
        *memory_args(config, shared=shared),
        "-machine", f"{machine},memory-backend=mem",
        *cpu,
        "-smp", str(config.vcpus),
        "-m", f"{config.memory_mib}M",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(config.guest.kernel),
        "-initrd", str(config.guest.initrd),
        "-append", kernel_cmdline(config.kernel_args),
        "-chardev", f"socket,id=console,path={paths.console},server=on,wait=off",
        "-serial", "chardev:console",
        "-drive", f"file={paths.overlay},if=none,id=root,format=qcow2,cache=unsafe",
        "-device", f"{blk},drive=root",
        "-device", f"{serial_bus},id=vser",
        "-chardev", f"socket,id=agent,path={paths.agent},server=on,wait=off",
        "-device", f"virtserialport,bus=vser.0,chardev=agent,name={AGENT_PORT_NAME}",
        "-qmp", f"unix:{paths.qmp},server=on,wait=off",
        # seccomp: no obsolete syscalls, no setuid/exec of helpers, no affinity games.
        "-sandbox", SECCOMP,
        *(["-incoming", "defer"] if incoming else []),
    ]  # fmt: skip


def overlay_argv(
    qemu_img: str, backing: Path, overlay: Path, backing_format: str = "raw"
) -> list[str]:
    return [
        *(qemu_img, "create", "-q", "-f", "qcow2"),
        *("-F", backing_format, "-b", str(backing), str(overlay)),
    ]


def parse_version(text: str) -> str:
    match = re.search(r"version (\d+\.\d+(?:\.\d+)?)", text)
    if not match:
        raise HostError(f"cannot parse QEMU version from {text!r}")
    return match.group(1)


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the parent thread ends."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def reap_in_background(popen: subprocess.Popen[bytes]) -> None:
    """Let a released child run on; a daemon thread reaps it whenever it ends."""
    threading.Thread(target=popen.wait, name=f"reap-{popen.pid}", daemon=True).start()


async def wait_for_exit(pid: int) -> None:
    """Wait until ``pid`` ends, without polling (a pidfd turns readable at exit)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[None] = loop.create_future()

    def on_exit() -> None:
        if not ended.done():
            ended.set_result(None)

    loop.add_reader(fd, on_exit)
    try:
        await ended
    finally:
        loop.remove_reader(fd)
        os.close(fd)


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
    ) -> None:
        self.accel = accel
        self.binary = binary
        self.qemu_img = qemu_img
        self.limits = limits
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

    async def start(self, config: VMConfig) -> QemuVM:
        self.version()  # a clear HostError when QEMU is missing
        await self._make_overlay(config, config.guest.rootfs, "raw")
        return self._spawn(config, build_argv(self.binary, self.accel, config))

    async def restore(
        self, config: VMConfig, snapshot: SnapshotFiles, *, adopt_disk: bool = False
    ) -> QemuVM:
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
        paths = QemuPaths(config.work_dir)
        if adopt_disk:
            _make_work_dir(config.work_dir)
            os.link(disk, paths.overlay)  # the snapshot keeps its name until we succeed
        else:
            await self._make_overlay(config, disk, "qcow2")
        # A clone maps the template's RAM file copy-on-write; the VM itself is no template.
        boot_config = replace(config, memory_file=snapshot.memory_file)
        argv = build_argv(self.binary, self.accel, boot_config, incoming=True, shared=False)
        state_fd = os.open(state, os.O_RDONLY)  # inherited by QEMU under the same number
        try:
            vm = self._spawn(config, argv, pass_fds=(state_fd,))
            await self._load(vm, state, state_fd, ignore_shared=snapshot.memory_file is not None)
        except BaseException:
            shutil.rmtree(config.work_dir, ignore_errors=True)
            raise
        finally:
            os.close(state_fd)
        return vm

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

    async def _make_overlay(self, config: VMConfig, backing: Path, backing_format: str) -> None:
        _make_work_dir(config.work_dir)
        proc = await asyncio.to_thread(
            subprocess.run,
            overlay_argv(
                self.qemu_img, backing, QemuPaths(config.work_dir).overlay, backing_format
            ),
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            shutil.rmtree(config.work_dir, ignore_errors=True)
            raise VMMError(f"qemu-img could not create the overlay: {proc.stderr.strip()}")

    def _spawn(self, config: VMConfig, argv: list[str], pass_fds: tuple[int, ...] = ()) -> QemuVM:
        paths = QemuPaths(config.work_dir)
        ephemeral = config.lifetime == "ephemeral"
        with paths.vmm_log.open("wb") as log:
            # Popen from the event loop's thread: PDEATHSIG fires when *that thread* ends.
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                pass_fds=pass_fds,
                preexec_fn=_die_with_parent if ephemeral else None,
            )
        cgroup = self._limit(config, popen.pid)
        dirs = cgroup.dirs if cgroup is not None else ()
        janitor = spawn_janitor(popen.pid, config.work_dir, dirs) if ephemeral else None
        return QemuVM(config, popen.pid, popen, janitor, self.version(), cgroup)

    def _limit(self, config: VMConfig, pid: int) -> cgroups.HostCgroup | None:
        """Put QEMU in its own host cgroup (guest RAM + overhead, pids), if configured."""
        if self.limits is None:
            return None
        memory = (config.memory_mib + self.limits.memory_overhead_mib) << 20
        cgroup = cgroups.create(config.vm_id, memory, self.limits.pids_max)
        if cgroup is None:
            return None
        try:
            cgroup.add(pid)
        except OSError as exc:
            log.warning("VM %s runs without host-side limits: %s", config.vm_id, exc)
            return None
        return cgroup

    async def attach(self, config: VMConfig, pid: int) -> QemuVM:
        info = read_process(pid)
        if info is None or str(config.work_dir) not in " ".join(info.args):
            raise VMMCrashed(f"no QEMU process {pid} for {config.work_dir}")
        return QemuVM(config, pid, None, None, self.version(), cgroups.existing(config.vm_id))


def _make_work_dir(work_dir: Path) -> None:
    work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    work_dir.chmod(0o700)


def spawn_janitor(
    pid: int, work_dir: Path, cgroup_dirs: tuple[Path, ...] = ()
) -> subprocess.Popen[bytes]:
    """A tiny watcher that removes an ephemeral VM if its owner dies without cleaning up.

    It blocks reading a pipe only we hold open; when our process ends for any reason
    (even SIGKILL) the read returns, and it kills QEMU and deletes the work dir and the
    VM's (by then empty) host cgroups.
    """
    script = (
        'cat >/dev/null; kill -9 "$1" 2>/dev/null; sleep 0.2; rm -rf -- "$2"; shift 2; '
        'for d in "$@"; do rmdir -- "$d" 2>/dev/null || { sleep 0.2; rmdir -- "$d"; }; done'
    )
    return subprocess.Popen(
        [
            *("/bin/sh", "-c", script, "emberbox-janitor", str(pid), str(work_dir)),
            *map(str, cgroup_dirs),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
