"""Where the repository is, short temp dirs (unix socket paths) and the processes that
mention a path (the VMMs a test started)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def short_tmp_dir(prefix: str) -> Path:
    """A temp dir under /tmp: unix socket paths must stay under 108 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def _cmdlines() -> list[tuple[int, bytes]]:
    """(pid, NUL-separated command line) of every process we may read."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            found.append((int(entry.name), (entry / "cmdline").read_bytes()))
        except OSError:
            continue
    return found


def qemu_pids_under(path: Path) -> list[int]:
    """PIDs of processes whose command line mentions ``path`` (VMMs we started)."""
    wanted = str(path).encode()
    return [
        pid
        for pid, cmdline in _cmdlines()
        if pid != os.getpid() and wanted in cmdline and b"qemu" in cmdline.split(b"\0")[0]
    ]


def pids_mentioning(text: str) -> list[int]:
    """PIDs of processes whose command line contains ``text``."""
    return [pid for pid, cmdline in _cmdlines() if text.encode() in cmdline]
