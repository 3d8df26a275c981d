"""The emberbox guest agent: PID 1 of a sandbox VM, running commands for the host.

Standard library only. In the guest the whole package is installed as
``/opt/emberbox/emberbox_guest/`` and started by the initramfs as PID 1 with
``python3 -m emberbox_guest`` (see ``emberbox/images/initramfs.py``), so it also does
the few duties of an init: mount the API file systems (cgroup2 included), reap every
child (orphans included) and power the machine off on request. On the host (tests) it
runs as an ordinary process with ``--listen unix:PATH`` and touches nothing global: the
clock, hostname, entropy pool and cgroups are used only when it is PID 1.

Pieces: :class:`Init` (PID 1 duties), :class:`Agent` (requests and transports), and
the modules it dispatches to: ``commands`` (exec), ``processes`` (spawn and friends),
``files``, ``archive`` (tar), over ``channel`` (one byte stream to the host).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import errno
import fcntl
import glob
import os
import platform
import signal
import socket
import struct
import time
import traceback
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from . import archive, cgroups, commands, common, files, netconf, processes, protocol
from .channel import Call, Channel, Session
from .protocol import Op

AGENT_VERSION = "0.1.0"
PROTOCOL = protocol.PROTOCOL_VERSION
PORT_WAIT_S = 10.0
REOPEN_DELAY_S = 0.25
SANDBOX_ID_FILE = "/run/emberbox/sandbox-id"
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
RB_POWER_OFF = 0x4321FEDC
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8
MOUNTS = (  # source, target, type, flags, options
    ("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
    ("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
    ("cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
    ("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755"),
    ("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "ptmxmode=0666,mode=0620,gid=5"),
    ("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
    ("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
    ("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"),
)
DEV_LINKS = {"fd": "", "stdin": "/0", "stdout": "/1", "stderr": "/2"}  # -> /proc/self/fd...

Handler = Callable[[dict[str, Any], Call], Awaitable[dict[str, Any]]]
log = common.log


# --- PID 1 duties -------------------------------------------------------------------


class Init:
    """What an init system would do for us: mounts, environment, loopback, power off."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)

    def run(self) -> None:
        os.environ.update(commands.DEFAULT_ENV)
        for source, target, fstype, flags, options in MOUNTS:
            self._mount(source, target, fstype, flags, options)
        for name, suffix in DEV_LINKS.items():
            with contextlib.suppress(OSError):  # no udev to make them; bash's <(...) needs them
                os.symlink("/proc/self/fd" + suffix, f"/dev/{name}")
        self._loopback_up()

    def power_off(self) -> None:
        os.sync()
        self._libc.reboot(RB_POWER_OFF)
        log(f"power off failed: {os.strerror(ctypes.get_errno())}")

    def _mount(self, source: str, target: str, fstype: str, flags: int, options: str) -> None:
        if _is_mount_point(target):  # the initramfs may have moved some mounts here
            return
        with contextlib.suppress(OSError):
            os.makedirs(target, exist_ok=True)
        data = options.encode() if options else None
        rc = self._libc.mount(
            source.encode(), target.encode(), fstype.encode(), ctypes.c_ulong(flags), data
        )
        err = ctypes.get_errno()
        if rc != 0 and err != errno.EBUSY:
            log(f"mount {fstype} on {target} failed: {os.strerror(err)}")

    def _loopback_up(self) -> None:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                ifreq = fcntl.ioctl(sock, SIOCGIFFLAGS, struct.pack("16sH22x", b"lo", 0))
                flags = struct.unpack_from("16sH", ifreq)[1] | IFF_UP
                fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags))
        except OSError as exc:
            log(f"could not bring lo up: {exc}")


def _is_mount_point(target: str) -> bool:
    try:
        with open("/proc/self/mounts", encoding="utf-8") as mounts:
            return any(line.split()[1:2] == [target] for line in mounts)
    except OSError:  # /proc itself is not mounted yet
        return False


class GuestSystem:
    """The global settings a hello changes; refused (with a warning) unless PID 1."""

    def __init__(self, enabled: bool) -> None:
        self._enabled = enabled

    def apply(self, what: str, action: Callable[[], object], warnings: list[str]) -> None:
        if not self._enabled:
            warnings.append(f"{what}: skipped, the agent is not PID 1")
            return
        try:
            action()
        except (OSError, ValueError) as exc:
            warnings.append(f"{what}: {exc}")

    @staticmethod
    def add_entropy(data: bytes) -> None:
        with open("/dev/random", "wb", buffering=0) as random:
            for i in range(0, len(data), 512):  # fcntl.ioctl takes at most 1024 bytes
                chunk = data[i : i + 512]
                info = struct.pack("ii", len(chunk) * 8, len(chunk)) + chunk
                fcntl.ioctl(random, RNDADDENTROPY, info)
            fcntl.ioctl(random, RNDRESEEDCRNG)

    @staticmethod
    def write_sandbox_id(sandbox_id: str) -> None:
        os.makedirs(os.path.dirname(SANDBOX_ID_FILE), exist_ok=True)
        with open(SANDBOX_ID_FILE, "w", encoding="utf-8") as out:
            out.write(sandbox_id + "\n")


# --- the agent ------------------------------------------------------------------------


class Agent:
    """Answers requests and serves the chosen transport until shut down."""

    stdin_ops = frozenset({Op.WRITE_STDIN, Op.WRITE, Op.TAR_IN})  # ops that read STDIN frames

    def __init__(self, init: Init | None, started: float) -> None:
        self._init = init
        self._started = started  # time.monotonic() when the agent process started
        self._system = GuestSystem(enabled=init is not None)
        self._reaper = commands.Reaper()
        self._cgroups = cgroups.Cgroups(enabled=init is not None)
        self._processes = processes.ProcessTable(self._reaper, self._cgroups)
        self._stop = asyncio.Event()
        table = self._processes
        self._ops: dict[Op, Handler] = {
            Op.HELLO: self._hello,
            Op.PING: _ok,
            Op.SHUTDOWN: _ok,  # the session powers off once the answer is sent
            Op.EXEC: self._exec,
            Op.SPAWN: table.spawn,
            Op.ATTACH: table.attach,
            Op.WRITE_STDIN: table.write_stdin,
            Op.SIGNAL: table.signal,
            Op.RESIZE: table.resize,
            Op.WAIT: table.wait,
            Op.PS: table.ps,
            Op.FORGET: table.forget,
            Op.STAT: files.stat,
            Op.LIST: files.list_dir,
            Op.READ: files.read,
            Op.WRITE: files.write,
            Op.MKDIR: files.make_dir,
            Op.REMOVE: files.remove,
            Op.RENAME: files.rename,
            Op.TAR_OUT: archive.tar_out,
            Op.TAR_IN: archive.tar_in,
        }

    async def run(self, transport: str) -> int:
        loop = asyncio.get_running_loop()
        self._reaper.install(loop)
        if self._init is None:  # tests stop us with SIGTERM: kill what we spawned first
            loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        log(f"started: version {AGENT_VERSION}, pid {os.getpid()}, transport {transport}")
        serve = asyncio.create_task(self._serve_forever(transport))
        stop = asyncio.create_task(self._stop.wait())
        await asyncio.wait([serve, stop], return_when=asyncio.FIRST_COMPLETED)
        for task in (serve, stop):
            task.cancel()
        await asyncio.gather(serve, stop, return_exceptions=True)
        await self._processes.aclose()
        failed = not serve.cancelled() and serve.exception() is not None
        if failed:
            log(f"serving failed: {serve.exception()!r}")
        return 1 if failed else 0

    async def handle(self, req: dict[str, Any], call: Call) -> dict[str, Any]:
        """The answer to one request; its data frames go through `call` as they come."""
        return await self._ops[parse_op(req.get("op"))](req, call)

    async def _exec(self, req: dict[str, Any], call: Call) -> dict[str, Any]:
        runner = commands.ExecRunner(self._reaper, self._cgroups, call.congested)
        return await runner.run(req, call.emit)

    def shutdown(self) -> None:
        if self._init is not None:
            self._init.power_off()  # returns only if the kernel refused
        else:
            self._stop.set()

    async def _hello(self, req: dict[str, Any], _call: Call) -> dict[str, Any]:
        time_ns, entropy = common.opt(req, "time_ns", int), common.opt_b64(req, "entropy")
        hostname = common.opt(req, "hostname", str)
        sandbox_id = common.opt(req, "sandbox_id", str)
        warnings: list[str] = []
        apply = partial(self._system.apply, warnings=warnings)
        if time_ns is not None:
            apply("set clock", partial(time.clock_settime_ns, time.CLOCK_REALTIME, time_ns))
        if entropy:
            apply("add entropy", partial(GuestSystem.add_entropy, entropy))
        if hostname is not None:
            apply("set hostname", partial(socket.sethostname, hostname))
        if sandbox_id is not None:
            apply("write sandbox id", partial(GuestSystem.write_sandbox_id, sandbox_id))
        if "network" in req:
            self._network(req["network"], warnings)
        return {
            "ok": True,
            "protocol": PROTOCOL,
            "agent_version": AGENT_VERSION,
            # From the monotonic clock, so that it follows the clock we may just have set.
            "boot_time": time.time() - (time.monotonic() - self._started),
            "kernel": platform.release(),
            "pid": os.getpid(),
            "warnings": warnings,
        }

    def _network(self, config: object, warnings: list[str]) -> None:
        """Set up (a dict) or take down (None) the NIC; an error answer if that fails."""
        if config is not None and not isinstance(config, dict):
            raise common.BadRequest("'network' must be an object or null")
        if self._init is None:
            warnings.append("network: skipped, the agent is not PID 1")
            return
        try:
            netconf.apply(config)
        except (OSError, ValueError) as exc:
            raise common.RequestError(f"network set-up failed: {exc}") from exc

    async def _serve_forever(self, transport: str) -> None:
        while True:
            try:
                await self._serve(transport)
            except Exception:
                if self._init is None:
                    raise
                log(f"serving failed, restarting: {traceback.format_exc()}")
            await asyncio.sleep(1.0)

    async def _serve(self, transport: str) -> None:
        if transport.startswith("unix:"):
            await self._serve_listener(listen_unix(transport.removeprefix("unix:")), False)
        elif transport == "vsock":
            await self._serve_listener(listen_vsock(), exclusive=True)
        else:
            await self._serve_serial()

    async def _serve_listener(self, sock: socket.socket, exclusive: bool) -> None:
        """Serves each accepted connection; `exclusive`: a new one replaces the old."""
        loop = asyncio.get_running_loop()
        sessions: set[asyncio.Task[str]] = set()
        sock.setblocking(False)
        try:
            while True:
                conn, _ = await loop.sock_accept(sock)
                if exclusive:  # the host reconnected: the old connection is dead
                    for old in sessions:
                        old.cancel()
                task = loop.create_task(self._serve_channel(conn.fileno(), conn.close, "conn"))
                sessions.add(task)
                task.add_done_callback(sessions.discard)
        finally:
            for task in sessions:
                task.cancel()
            await asyncio.gather(*sessions, return_exceptions=True)
            sock.close()

    async def _serve_serial(self) -> None:
        while True:
            path = await wait_for_port(PORT_WAIT_S)
            try:
                fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
            except OSError as exc:
                log(f"cannot open {path}: {exc}")
                await asyncio.sleep(1.0)
                continue
            # EOF means the host is not (or no longer) connected: reopen and wait for it.
            await self._serve_channel(fd, partial(os.close, fd), path)
            await asyncio.sleep(REOPEN_DELAY_S)

    async def _serve_channel(self, fd: int, closer: Callable[[], None], name: str) -> str:
        ready = {"event": "ready", "agent_version": AGENT_VERSION, "protocol": PROTOCOL}
        return await Session(Channel(fd, closer, name), self, ready).run()


def parse_op(value: object) -> Op:
    """The request's op; BadRequest for anything that is not one of `Op`."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return Op(value)
    raise common.BadRequest(f"unknown op {value!r}")


async def _ok(_req: dict[str, Any], _call: Call) -> dict[str, Any]:
    return {"ok": True}


def listen_unix(path: str) -> socket.socket:
    """A listening unix socket that appears at `path` only once it accepts connections."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staging = f"{path}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(staging)
    try:
        sock.bind(staging)
        sock.listen(8)
        os.replace(staging, path)
    except OSError:
        sock.close()
        raise
    return sock


def listen_vsock() -> socket.socket:
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        sock.bind((socket.VMADDR_CID_ANY, protocol.AGENT_VSOCK_PORT))
        sock.listen(8)
    except OSError:
        sock.close()
        raise
    return sock


def find_port_device() -> str | None:
    """/dev path of the agent's virtio-serial port (devtmpfs makes the node; no udev link)."""
    for name_file in sorted(glob.glob("/sys/class/virtio-ports/*/name")):
        with contextlib.suppress(OSError), open(name_file, encoding="utf-8") as f:
            if f.read().strip() == protocol.AGENT_PORT_NAME:
                return "/dev/" + os.path.basename(os.path.dirname(name_file))
    return None


async def wait_for_port(timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while (device := find_port_device()) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no virtio-serial port named {protocol.AGENT_PORT_NAME}")
        await asyncio.sleep(0.1)
    return device


def choose_transport(listen: str | None) -> str:
    """--listen, else emberbox.transport= on the kernel command line, else serial."""
    if listen:
        return listen
    try:
        with open("/proc/cmdline", encoding="utf-8") as f:
            words = f.read().split()
    except OSError:
        words = []
    for word in words:
        if word.startswith("emberbox.transport="):
            value = word.partition("=")[2]
            if value in ("vsock", "serial"):
                return value
            log(f"unknown transport {value!r}, using serial")
    return "serial"


def _ignore_signal(signo: int, _frame: object) -> None:
    log(f"ignored signal {signo}")


def _run_ahead_of_commands() -> None:
    """PID 1 gets the CPU before any command (hostile suite): in a guest swamped by a
    fork bomb it still kills at the timeout, reaps and answers. Commands and threads
    start with the default policy again (SCHED_RESET_ON_FORK); the kernel's real-time
    throttling keeps 5% of the CPU for them even if the agent spun."""
    try:
        policy = os.SCHED_FIFO | os.SCHED_RESET_ON_FORK
        os.sched_setscheduler(0, policy, os.sched_param(1))
    except OSError as exc:
        log(f"could not run ahead of commands: {exc}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="emberbox-agent")
    parser.add_argument("--listen", help="unix:PATH (host-side tests)")
    args = parser.parse_args(argv)
    if args.listen and not args.listen.startswith("unix:"):
        parser.error("--listen takes unix:PATH")
    started = time.monotonic()
    transport = choose_transport(args.listen)
    init = Init() if os.getpid() == 1 else None
    if init is not None:
        init.run()
        # The kernel delivers to PID 1 only the signals it handles, and Python handles
        # SIGINT by ending the agent: `kill -INT 1` from inside must not (hostile suite).
        # A Python-level handler, not SIG_IGN, so that commands start with the default.
        signal.signal(signal.SIGINT, _ignore_signal)
        _run_ahead_of_commands()
    while True:
        try:
            code = asyncio.run(Agent(init, started).run(transport))
        except BaseException:  # as PID 1, exiting would panic the kernel
            if init is None:
                raise
            log(f"agent crashed, restarting: {traceback.format_exc()}")
            code = 1
        if init is None:
            return code
        time.sleep(1.0)
