"""The guest system the agent sets up: PID 1's duties at boot, and what a hello changes.

Standard library only. At boot, as PID 1, :func:`boot` mounts the API file systems
(cgroup2 included), makes the ``/dev`` links no udev makes, brings the loopback up,
keeps ``kill -INT 1`` from ending the agent and lets it run ahead of commands.
:class:`Init` also powers the machine off on request. A hello then sets the clock,
feeds the entropy pool, names the host, writes the sandbox id and configures the NIC
(:class:`GuestSystem`); on the host (tests), not PID 1, all of that is skipped with a
warning, so the agent touches nothing global.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import signal
import socket
import struct
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from . import commands, common, netconf

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


def boot() -> Init:
    """PID 1's set-up before the agent serves: the init's duties, then signals and
    scheduling."""
    init = Init()
    init.run()
    # The kernel delivers to PID 1 only the signals it handles, and Python handles
    # SIGINT by ending the agent: `kill -INT 1` from inside must not (hostile suite).
    # A Python-level handler, not SIG_IGN, so that commands start with the default.
    signal.signal(signal.SIGINT, _ignore_signal)
    _run_ahead_of_commands()
    return init


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


# --- what a hello changes -------------------------------------------------------------


class GuestSystem:
    """The global settings a hello changes; refused (with a warning) unless PID 1."""

    def __init__(self, enabled: bool) -> None:
        self._enabled = enabled

    def configure(self, req: dict[str, Any]) -> list[str]:
        """Apply the hello's settings; returns the warnings of those that failed (a bad
        field is BadRequest before anything changes, a failed network an error answer)."""
        time_ns, entropy = common.opt(req, "time_ns", int), common.opt_b64(req, "entropy")
        hostname = common.opt(req, "hostname", str)
        sandbox_id = common.opt(req, "sandbox_id", str)
        warnings: list[str] = []
        apply = partial(self.apply, warnings=warnings)
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
        return warnings

    def apply(self, what: str, action: Callable[[], object], warnings: list[str]) -> None:
        if not self._enabled:
            warnings.append(f"{what}: skipped, the agent is not PID 1")
            return
        try:
            action()
        except (OSError, ValueError) as exc:
            warnings.append(f"{what}: {exc}")

    def _network(self, config: object, warnings: list[str]) -> None:
        """Set up (a dict) or take down (None) the NIC; an error answer if that fails."""
        if config is not None and not isinstance(config, dict):
            raise common.BadRequest("'network' must be an object or null")
        if not self._enabled:
            warnings.append("network: skipped, the agent is not PID 1")
            return
        try:
            netconf.apply(config)
        except (OSError, ValueError) as exc:
            raise common.RequestError(f"network set-up failed: {exc}") from exc

    # Both with os-level calls, not open(): on a restored clone's first hello every
    # code path is new to TCG, and the io stack's objects (and makedirs' exception when
    # the directory exists) were ~2,700 of the hello's ~16,000 translated blocks.
    @staticmethod
    def add_entropy(data: bytes) -> None:
        random = os.open("/dev/random", os.O_WRONLY | os.O_CLOEXEC)
        try:
            for i in range(0, len(data), 512):  # fcntl.ioctl takes at most 1024 bytes
                chunk = data[i : i + 512]
                info = struct.pack("ii", len(chunk) * 8, len(chunk)) + chunk
                fcntl.ioctl(random, RNDADDENTROPY, info)
            fcntl.ioctl(random, RNDRESEEDCRNG)
        finally:
            os.close(random)

    @staticmethod
    def write_sandbox_id(sandbox_id: str) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        try:
            fd = os.open(SANDBOX_ID_FILE, flags, 0o644)
        except FileNotFoundError:  # the first hello after a boot
            os.makedirs(os.path.dirname(SANDBOX_ID_FILE), exist_ok=True)
            fd = os.open(SANDBOX_ID_FILE, flags, 0o644)
        try:
            os.write(fd, (sandbox_id + "\n").encode())
        finally:
            os.close(fd)
