"""The Firecracker driver: one ``firecracker`` process per VM, configured over its API socket.

Layout of a VM, all in the directory Firecracker runs in (``work_dir``, or the jail root
under the jailer; ``console.log`` and, without jailer, everything else in ``work_dir``)::

    fc.sock          API socket (``run/firecracker.socket`` in a jail)
    console.log      the process's stdout+stderr: the guest serial console
    firecracker.log  Firecracker's own log          metrics.json   its metrics
    rootfs.ext4      this VM's copy-on-write copy of the image's rootfs (the image is
                     never written)
    vsock.sock       host end of the vsock device: ``CONNECT 1024`` reaches the agent

Snapshots and disk paths: Firecracker records the drive's ``path_on_host`` (and the vsock
``uds_path``) inside the snapshot and reopens them on load; the load API can override
the vsock path and TAP names, but not drive paths. So both are given *relative* to the
process's working directory, and a restored VM gets a fresh process running in its own
directory with its copy of the snapshot's disk under the same name. This is also how
paths work in a jail, so plain and jailed VMs share one scheme.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import itertools
import os
import select
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import httpx

from emberbox.errors import BootTimeout, HostError, SnapshotMismatch, VMMCrashed, VMMError
from emberbox.guest.protocol import AGENT_VSOCK_PORT
from emberbox.vmm import fc_api, jailer
from emberbox.vmm.base import AgentStream, SnapshotFiles, VMConfig
from emberbox.vmm.fc_api import ApiRequest, BootPlan, VsockHandshake, VsockRefused
from emberbox.vmm.host import kvm_device_usable, read_process, socket_path_fits
from emberbox.vmm.jailer import JailerConfig

NAME = "firecracker"
API_SOCKET = "fc.sock"
CONSOLE_LOG = "console.log"
FC_LOG = "firecracker.log"
METRICS = "metrics.json"
ROOTFS = "rootfs.ext4"
VSOCK = "vsock.sock"
SNAPSHOT_STATE = "vmstate"
SNAPSHOT_MEMORY = "memory"
GUEST_CID = 3
_PR_SET_PDEATHSIG = 1
_FICLONE = 0x40049409
_ZERO = bytes(1 << 16)


def firecracker_usable(binary: str = NAME) -> tuple[bool, str]:
    """Whether Firecracker can run VMs here, and why not: binary present, KVM openable."""
    if shutil.which(binary) is None:
        return False, f"no Firecracker binary {binary!r} on PATH"
    kvm = kvm_device_usable()
    if not kvm.usable:
        return False, kvm.reason
    return True, "Firecracker binary found and /dev/kvm usable"


def clone_file(src: Path, dest: Path) -> None:
    """Copy ``src`` to ``dest`` (mode 0600) without writing ``src``: a reflink, else sparse.

    A reflink (FICLONE: btrfs, XFS) shares blocks until either side writes, so a VM's disk
    costs nothing until the guest writes. Elsewhere zero blocks become holes.
    """
    with contextlib.suppress(FileNotFoundError):
        dest.unlink()
    with open(src, "rb") as fin, open(dest, "xb", opener=_private_opener) as fout:
        try:
            fcntl.ioctl(fout.fileno(), _FICLONE, fin.fileno())
            return
        except OSError:  # EOPNOTSUPP / EXDEV / EINVAL: no reflinks here
            pass
        while chunk := fin.read(len(_ZERO)):
            if chunk == _ZERO[: len(chunk)]:
                fout.seek(len(chunk), os.SEEK_CUR)
            else:
                fout.write(chunk)
        fout.truncate()  # a trailing hole still needs the file to have its full size


def _private_opener(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


def read_tail(path: Path, max_bytes: int) -> str:
    """The last ``max_bytes`` of a file, decoded leniently; empty if there is no file."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - max_bytes))
            return f.read(max_bytes).decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def trim_log(path: Path, max_bytes: int) -> None:
    """Keep an append-only log under ``max_bytes`` by dropping its older half.

    The guest writes the console as fast as it likes; the file's writer holds it with
    O_APPEND, so after truncation its writes land at the new end. Lines written during
    the trim may be lost or reordered, acceptable for a console log.
    """
    try:
        if path.stat().st_size <= max_bytes:
            return
        with open(path, "rb") as f:
            f.seek(-(max_bytes // 2), os.SEEK_END)
            kept = f.read()
        os.truncate(path, 0)
        with open(path, "ab") as f:
            f.write(b"[... older console output trimmed ...]\n" + kept)
    except FileNotFoundError:
        pass


def cmdline_matches(argv: list[str], api_socket: str, jail_id: str | None = None) -> bool:
    """Whether a process's argv is the Firecracker serving ``api_socket`` (and jail id)."""
    # argv[1] too: an interpreter running a wrapper script named firecracker.
    if not any("firecracker" in Path(arg).name for arg in argv[:2]):
        return False
    if not _has_option(argv, "--api-sock", api_socket):
        return False
    return jail_id is None or _has_option(argv, "--id", jail_id)


def _has_option(argv: list[str], name: str, value: str) -> bool:
    pairs = itertools.pairwise(argv)
    return f"{name}={value}" in argv or any(a == name and b == value for a, b in pairs)


# --- vsock -----------------------------------------------------------------------------


async def connect_vsock(
    uds: Path,
    port: int,
    timeout_s: float,
    *,
    is_running: Callable[[], bool] = lambda: True,
    console_tail: Callable[[], str] = lambda: "",
) -> AgentStream:
    """A stream to guest vsock ``port`` through Firecracker's unix socket ``uds``.

    Retries with backoff while the guest is still booting (no socket yet, or Firecracker
    closing the connection because nothing listens on the port); BootTimeout after
    ``timeout_s``, VMMCrashed as soon as the process is gone.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    delay, last = 0.01, "never tried"
    while True:
        if not is_running():
            raise VMMCrashed("Firecracker exited while waiting for the guest agent", console_tail())
        try:
            async with asyncio.timeout(max(0.0, min(deadline - loop.time(), _ATTEMPT_S))):
                return await _vsock_attempt(uds, port)
        except (OSError, VsockRefused) as exc:  # TimeoutError is an OSError
            last = str(exc) or type(exc).__name__
        if loop.time() + delay >= deadline:
            raise BootTimeout(
                f"guest agent not reachable on vsock port {port} after {timeout_s:g}s: {last}",
                console_tail(),
            )
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.25)


_ATTEMPT_S = 2.0  # one CONNECT is answered at once by a live guest; longer means a hang


async def _vsock_attempt(uds: Path, port: int) -> AgentStream:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, str(uds))
        await loop.sock_sendall(sock, fc_api.connect_request(port))
        handshake = VsockHandshake()
        while (accepted := handshake.feed(data := await loop.sock_recv(sock, 4096))) is None:
            if not data:
                raise handshake.eof()
        # Bytes that came with the OK line are the agent's: they go first into the reader,
        # before the transport exists and can deliver anything newer.
        reader = asyncio.StreamReader()
        reader.feed_data(accepted.leftover)
        protocol = asyncio.StreamReaderProtocol(reader)
        transport, _ = await loop.create_unix_connection(lambda: protocol, sock=sock)
    except BaseException:
        sock.close()
        raise
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


# --- processes -------------------------------------------------------------------------


class _Process(Protocol):
    """A VMM process: our child, or one we adopted (after a restart, or the jailer's)."""

    pid: int

    def poll(self) -> int | None:
        """The exit status once it ended, else None."""
        ...

    def kill(self) -> None: ...


class _Child:
    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid

    def poll(self) -> int | None:
        return self._popen.poll()  # also reaps it

    def kill(self) -> None:
        if self._popen.poll() is None:
            self._popen.kill()

    def reap_in_background(self) -> None:
        threading.Thread(target=self._popen.wait, name=f"reap-{self.pid}", daemon=True).start()


class _Adopted:
    """Not our child: a pidfd tells when it ends and signals it without pid-reuse races.

    Its exit status belongs to its real parent (init), so :meth:`poll` reports -1.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fd: int | None = os.pidfd_open(pid)  # ProcessLookupError if gone already

    def poll(self) -> int | None:
        if self._fd is not None and select.select([self._fd], [], [], 0)[0]:
            os.close(self._fd)
            self._fd = None
        return -1 if self._fd is None else None

    def kill(self) -> None:
        if self.poll() is None and self._fd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._fd, signal.SIGKILL)


async def _wait_exit(process: _Process, timeout_s: float) -> bool:
    """Whether the process ended (and, for a child, was reaped) within ``timeout_s``."""
    # Polling works alike for children and adopted processes; 10 ms is cheap for teardown.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            while process.poll() is None:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
    return process.poll() is not None


def _die_with_parent(parent: int) -> Callable[[], None]:
    """A preexec_fn making the child receive SIGKILL when its parent dies ("ephemeral").

    The signal fires when the *thread* that forked the child exits, so spawn from the
    event loop's thread, never from a worker thread.
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork, not in the child

    def preexec() -> None:
        if prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent died before prctl: nobody would kill us
            os._exit(1)

    return preexec


def _spawn(argv: list[str], cwd: Path, console: Path, die_with_parent: bool) -> _Child:
    fd = os.open(console, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        popen = subprocess.Popen(
            argv,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            start_new_session=True,  # a Ctrl-C meant for the server does not reach its VMs
            preexec_fn=_die_with_parent(os.getpid()) if die_with_parent else None,
        )
    except FileNotFoundError as exc:
        raise HostError(f"cannot run {argv[0]!r}: not found", binary=argv[0]) from exc
    finally:
        os.close(fd)
    return _Child(popen)


# --- the VM ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """Where a VM's files are on the host, and how Firecracker names them."""

    work_dir: Path
    root: Path  # Firecracker's working directory: work_dir, or the jail root
    api_socket: Path  # host path
    api_socket_arg: str  # as passed to --api-sock
    jail: tuple[JailerConfig, str] | None = None  # config and jail id

    @property
    def console(self) -> Path:
        return self.work_dir / CONSOLE_LOG


def _remove_vm_files(layout: _Layout) -> None:
    for sock in (layout.api_socket, layout.root / VSOCK):
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
    shutil.rmtree(layout.work_dir, ignore_errors=True)
    if layout.jail is not None:
        jailer.remove_jail(*layout.jail)


class FirecrackerVM:
    """A running Firecracker process and the API client that steers it."""

    def __init__(
        self,
        vm_id: str,
        layout: _Layout,
        process: _Process,
        *,
        version: Callable[[], str],
        console_max_bytes: int,
        api_timeout_s: float,
        snapshot_timeout_s: float,
    ) -> None:
        self._vm_id = vm_id
        self._layout = layout
        self._process = process
        self._version = version
        self._console_max = console_max_bytes
        self._snapshot_timeout_s = snapshot_timeout_s
        self._paused = False
        self._client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(layout.api_socket)),
            base_url="http://localhost",
            timeout=api_timeout_s,
        )

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
        await self.request(ApiRequest("PATCH", "/vm", fc_api.vm_state_payload("Paused")))
        self._paused = True

    async def resume(self) -> None:
        await self.request(ApiRequest("PATCH", "/vm", fc_api.vm_state_payload("Resumed")))
        self._paused = False

    async def snapshot(self, dest: Path, *, stop: bool = False) -> SnapshotFiles:
        """Write ``vmstate``, ``memory`` and ``rootfs.ext4`` into ``dest``.

        Firecracker resets the vsock transport while snapshotting: open agent streams end
        and must be reopened (the guest's listening socket survives). With ``stop`` the
        VMM is killed after the save (its files go with it).
        """
        dest = _private_dir(dest)
        paused_here = not self._paused
        if paused_here:
            await self.pause()
        try:
            await self._write_snapshot(dest)
            # The disk is copied while paused, so it matches the memory image exactly.
            await asyncio.to_thread(clone_file, self._layout.root / ROOTFS, dest / ROOTFS)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        finally:
            if paused_here and self.is_running() and not stop:
                await self.resume()
        if stop:
            await self.kill()
        return SnapshotFiles(dest, NAME, self._version())

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
        await self.request(req, timeout_s=self._snapshot_timeout_s)
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
        self._process.kill()
        try:
            await self._client.aclose()
            await self._wait_gone(10.0)
        finally:
            self._remove_files()  # synchronous: runs even when the awaits were cancelled

    async def release(self) -> None:
        """Leave the VM running; a daemon thread reaps our child whenever it ends."""
        await self._client.aclose()
        if isinstance(self._process, _Child):
            self._process.reap_in_background()

    async def _wait_gone(self, timeout_s: float) -> None:
        if not await _wait_exit(self._process, timeout_s):
            raise VMMError(f"Firecracker pid {self.pid} survived SIGKILL for {timeout_s:g}s")

    def _remove_files(self) -> None:
        _remove_vm_files(self._layout)

    async def request(self, req: ApiRequest, timeout_s: float | None = None) -> None:
        """Send one API call; a refusal or a dead process becomes a VMMError."""
        timeout = httpx.USE_CLIENT_DEFAULT if timeout_s is None else timeout_s
        try:
            resp = await self._client.request(req.method, req.path, json=req.body, timeout=timeout)
        except httpx.TransportError as exc:
            raise self._failure(f"Firecracker API {req.method} {req.path} failed: {exc}") from exc
        if not resp.is_success:
            raise fc_api.api_error(resp.status_code, resp.content, req, self.console_tail())

    def _failure(self, message: str) -> VMMError:
        status = self._process.poll()
        if status is not None:
            return VMMCrashed(f"Firecracker exited (status {status})", self.console_tail())
        return VMMError(message, self.console_tail())

    async def wait_api(self, timeout_s: float) -> None:
        """Return once the API socket accepts connections."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            if not self.is_running():
                raise self._failure("")
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_unix_connection(self._layout.api_socket)
                writer.close()
                await writer.wait_closed()
                return
            if loop.time() > deadline:
                raise VMMError(
                    f"no Firecracker API socket at {self._layout.api_socket} after {timeout_s:g}s",
                    self.console_tail(),
                )
            await asyncio.sleep(0.01)


# --- the driver ------------------------------------------------------------------------


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
    ) -> None:
        self._binary = str(jailer.exec_file) if jailer is not None else binary
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
        layout = self._layout(config)
        guest = config.guest
        _require_files(guest.vmlinux, guest.initrd, guest.rootfs)
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
        )
        requests = fc_api.boot_requests(plan)  # before any file is made: bad shapes fail fast

        async def place_files() -> None:
            await asyncio.to_thread(clone_file, guest.rootfs, layout.root / ROOTFS)
            if jailed:
                jailer.link_or_copy(guest.vmlinux, layout.root / "vmlinux")
                jailer.link_or_copy(guest.initrd, layout.root / "initrd")
            self._hand_over(layout, ROOTFS, FC_LOG, METRICS)

        return await self._launch(config, layout, place_files, requests)

    async def restore(
        self, config: VMConfig, snapshot: SnapshotFiles, *, adopt_disk: bool = False
    ) -> FirecrackerVM:
        """Restore ``snapshot`` (its disk is copied in, reflinked where the filesystem can;
        ``adopt_disk`` changes nothing here: the snapshot is left whole either way)."""
        if snapshot.vmm != NAME:
            raise SnapshotMismatch(
                f"snapshot was written by {snapshot.vmm!r}, not {NAME!r}",
                snapshot=str(snapshot.directory),
            )
        src = snapshot.directory.absolute()
        _require_files(src / SNAPSHOT_STATE, src / SNAPSHOT_MEMORY, src / ROOTFS)
        layout = self._layout(config)
        state, memory = str(src / SNAPSHOT_STATE), str(src / SNAPSHOT_MEMORY)
        if layout.jail is not None:
            state, memory = SNAPSHOT_STATE, SNAPSHOT_MEMORY

        async def place_files() -> None:
            # Same relative name as when the snapshot was taken: Firecracker reopens it.
            await asyncio.to_thread(clone_file, src / ROOTFS, layout.root / ROOTFS)
            if layout.jail is not None:
                # Copies, not links: the jailed uid must own them; the snapshot stays shared.
                for name in (SNAPSHOT_STATE, SNAPSHOT_MEMORY):
                    await asyncio.to_thread(clone_file, src / name, layout.root / name)
                self._hand_over(layout, SNAPSHOT_STATE, SNAPSHOT_MEMORY)
            self._hand_over(layout, ROOTFS, FC_LOG, METRICS)

        requests = fc_api.restore_requests(FC_LOG, METRICS, state, memory)
        return await self._launch(config, layout, place_files, requests)

    async def attach(self, config: VMConfig, pid: int) -> FirecrackerVM:
        layout = self._layout(config)
        try:
            process = _Adopted(pid)
            info = read_process(pid)
            if info is None:
                raise ProcessLookupError(pid)
            argv = list(info.args)
        except ProcessLookupError as exc:
            raise VMMCrashed(f"Firecracker pid {pid} of VM {config.vm_id} is gone") from exc
        jail_id = layout.jail[1] if layout.jail is not None else None
        if not cmdline_matches(argv, layout.api_socket_arg, jail_id) or process.poll() is not None:
            raise VMMCrashed(f"pid {pid} is not the Firecracker of VM {config.vm_id} any more")
        return self._vm(config, layout, process)

    def _layout(self, config: VMConfig) -> _Layout:
        work_dir = config.work_dir.absolute()
        if self._jailer is None:
            sock = work_dir / API_SOCKET
            layout = _Layout(work_dir, work_dir, sock, str(sock))
        else:
            jail_id = jailer.check_jail_id(config.vm_id)
            root = jailer.jail_root(self._jailer, jail_id)
            sock = jailer.api_socket_path(self._jailer, jail_id)
            layout = _Layout(work_dir, root, sock, jailer.JAIL_API_SOCKET, (self._jailer, jail_id))
        for path in (layout.api_socket, layout.root / VSOCK):
            if not socket_path_fits(path):
                raise HostError(f"socket path too long for a unix socket: {path}")
        return layout

    def _make_dirs(self, layout: _Layout) -> None:
        layout.work_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        layout.work_dir.chmod(0o700)
        if layout.jail is not None:
            jailer.make_jail_root(*layout.jail)
        for stale in (layout.api_socket, layout.root / VSOCK):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        for name in (FC_LOG, METRICS):  # Firecracker opens these but does not create them
            (layout.root / name).touch(mode=0o600)

    @staticmethod
    def _hand_over(layout: _Layout, *names: str) -> None:
        """Give files we made for a jailed Firecracker to its uid (it cannot read ours)."""
        if layout.jail is not None:
            for name in names:
                jailer.give_to_jail(layout.jail[0], layout.root / name)

    async def _launch(
        self,
        config: VMConfig,
        layout: _Layout,
        place_files: Callable[[], Awaitable[None]],
        requests: list[ApiRequest],
    ) -> FirecrackerVM:
        """Make the files, spawn, configure; on any failure leave nothing behind."""
        vm: FirecrackerVM | None = None
        try:
            self._make_dirs(layout)
            await place_files()
            process = await self._spawn(config, layout)
            vm = self._vm(config, layout, process)
            await vm.wait_api(self._socket_timeout_s)
            for req in requests:
                slow = req.path.startswith("/snapshot/")  # reads the whole memory file
                await vm.request(req, timeout_s=self._snapshot_timeout_s if slow else None)
        except BaseException:
            if vm is not None:
                await vm.kill()
            else:
                _remove_vm_files(layout)
            raise
        return vm

    async def _spawn(self, config: VMConfig, layout: _Layout) -> _Process:
        if self._jailer is None:
            argv = [self._binary, "--api-sock", layout.api_socket_arg]
            return _spawn(argv, layout.root, layout.console, config.lifetime == "ephemeral")
        # The jailer drops privileges, which clears the parent-death signal: a jailed VM
        # always outlives a crashed server, and teardown relies on the service's reaper.
        netns = config.extra.get("netns")
        argv = jailer.jailer_command(
            self._jailer,
            config.vm_id,
            config.vcpus,
            config.memory_mib,
            Path(netns) if netns else None,
        )
        child = _spawn(argv, layout.work_dir, layout.console, die_with_parent=False)
        if not self._jailer.new_pid_ns:
            return child  # the jailer exec'd into Firecracker: same process
        return await self._adopt_from_jailer(child, layout)

    async def _adopt_from_jailer(self, child: _Child, layout: _Layout) -> _Process:
        """With --new-pid-ns the jailer forks Firecracker, records its pid and exits."""
        assert layout.jail is not None
        try:
            exited = await _wait_exit(child, self._socket_timeout_s)
        finally:
            child.kill()  # no-op once exited; reaps nothing else
            await _wait_exit(child, 1.0)
        pid_path = jailer.pid_file(*layout.jail)
        if not exited or child.poll() != 0 or not pid_path.exists():
            tail = read_tail(layout.console, 8192)
            raise VMMCrashed(f"jailer failed (status {child.poll()}) for {layout.jail[1]}", tail)
        try:
            return _Adopted(int(pid_path.read_text().strip()))
        except (ValueError, ProcessLookupError) as exc:
            raise VMMCrashed("Firecracker died right after the jailer started it") from exc

    def _vm(self, config: VMConfig, layout: _Layout, process: _Process) -> FirecrackerVM:
        return FirecrackerVM(
            config.vm_id,
            layout,
            process,
            version=self.version,
            console_max_bytes=config.console_log_max_bytes,
            api_timeout_s=self._api_timeout_s,
            snapshot_timeout_s=self._snapshot_timeout_s,
        )


def _private_dir(path: Path) -> Path:
    path = path.absolute()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _require_files(*paths: Path) -> None:
    for path in paths:
        if not path.is_file():
            raise HostError(f"missing file {path}", path=str(path))
