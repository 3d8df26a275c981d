"""Facts about the host that drivers and the service both read: /proc, /dev/kvm, socket limits.

One place for them, so a driver's "is my VMM still alive" and the service's orphan sweep
parse ``/proc`` the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL


@dataclass(frozen=True)
class ProcInfo:
    """A process as ``/proc`` shows it."""

    pid: int
    uid: int
    args: tuple[str, ...]


@dataclass(frozen=True)
class KvmVerdict:
    usable: bool
    reason: str


def parse_cmdline(raw: bytes) -> tuple[str, ...]:
    """``/proc/<pid>/cmdline`` (NUL-separated, usually NUL-terminated) as arguments."""
    if raw.endswith(b"\0"):
        raw = raw[:-1]
    if not raw:
        return ()
    return tuple(part.decode("utf-8", "surrogateescape") for part in raw.split(b"\0"))


def parse_stat_state(raw: str) -> str:
    """The state letter of ``/proc/<pid>/stat`` (``Z`` zombie, ``X`` dead, ...).

    The command name in parentheses may itself hold spaces and parentheses, so split
    after the last ``)``.
    """
    _, _, rest = raw.rpartition(")")
    fields = rest.split()
    if not fields:
        raise ValueError(f"unparseable /proc stat line: {raw!r}")
    return fields[0]


def read_process(pid: int, proc: Path = PROC) -> ProcInfo | None:
    """The live (non-zombie) process ``pid``, or None if it is gone or unreadable."""
    base = proc / str(pid)
    try:
        uid = base.stat().st_uid
        if parse_stat_state((base / "stat").read_text()) in {"Z", "X", "x"}:
            return None
        args = parse_cmdline((base / "cmdline").read_bytes())
    except (OSError, ValueError):
        return None
    return ProcInfo(pid=pid, uid=uid, args=args)


def kvm_device_usable(path: str = "/dev/kvm") -> KvmVerdict:
    """Whether ``/dev/kvm`` exists and this process may open it read-write."""
    if not os.path.exists(path):
        return KvmVerdict(False, f"{path} does not exist (no hardware virtualization here)")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return KvmVerdict(False, f"{path} cannot be opened read-write: {exc.strerror}")
    os.close(fd)
    return KvmVerdict(True, f"{path} is usable")


def socket_path_fits(path: Path) -> bool:
    return len(os.fsencode(path)) <= UNIX_PATH_MAX
