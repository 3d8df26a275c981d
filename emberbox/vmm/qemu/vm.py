"""One running QEMU VM: its process, its QMP session and console, its snapshots.

A :class:`QemuVM` is made by :class:`~emberbox.vmm.qemu.driver.QemuDriver` (started,
restored or attached to after a server restart). It implements :class:`emberbox.vmm.base.VM`:
the agent's byte stream is a unix socket to QEMU's virtio-serial port, pause, resume and
snapshots go through QMP (:mod:`emberbox.vmm.qemu.qmp`, :mod:`emberbox.vmm.qemu.migration`),
and killing it removes its work dir, its host cgroup and its janitor.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from emberbox.errors import VMMCrashed, VMMError
from emberbox.vmm import cgroups
from emberbox.vmm.base import AgentStream, SnapshotFiles, VMConfig
from emberbox.vmm.console import ConsoleLog
from emberbox.vmm.host import read_process
from emberbox.vmm.phases import Phases
from emberbox.vmm.qemu import files as qemu_files
from emberbox.vmm.qemu import migration
from emberbox.vmm.qemu.argv import QemuPaths
from emberbox.vmm.qemu.process import reap_in_background, wait_for_exit
from emberbox.vmm.qemu.qmp import QMPClient

NAME = "qemu"  # the backend, as snapshots record it
STATE_FILE = "state"  # in a snapshot directory: device state (+ RAM unless a template)
DISK_FILE = "disk.qcow2"  # in a snapshot directory: the disk as it was
QMP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Incoming:
    """The saved state a ``-incoming defer`` QEMU waits for: the file (for messages),
    the number QEMU inherited it under, whether its RAM stays in a shared file, and
    whether it is loaded already (the guest paused, never run: a spare's)."""

    state: Path
    fd_number: int
    ignore_shared: bool
    loaded: bool = False


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
        self.phases = Phases()  # how its start went (the driver's timing points)
        self.incoming: Incoming | None = None  # prelaunched: the state it waits for
        self.prepared_phases: Phases | None = None  # a prelaunched VM's start, once used
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
                qemu_files.keep_disk(self.paths.overlay, dest / DISK_FILE, move=True)
                shutil.rmtree(self.work_dir, ignore_errors=True)
                await self._close_qmp()
                await self.console.aclose()
            else:
                # Migration flushed the disk's metadata and left it inactive: copy it now,
                # while the guest cannot write, then let the guest run on.
                await asyncio.to_thread(
                    qemu_files.keep_disk, self.paths.overlay, dest / DISK_FILE, move=False
                )
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
