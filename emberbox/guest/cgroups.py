"""cgroup v2 limits for the agent's commands (standard library only).

A limited command runs in a group of its own under ``/sys/fs/cgroup/emberbox/``, with
``memory.max`` (and no swap) and ``pids.max``. The child joins the group between fork
and exec, so not one page it touches escapes the limit. Only the PID 1 agent uses
cgroups: on a host (tests) they belong to the host, and limits are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from dataclasses import dataclass
from typing import Any

from . import common

CGROUP_ROOT = "/sys/fs/cgroup"
PARENT = "emberbox"
CONTROLLERS = "+memory +pids"
REMOVE_WAIT_S = 2.0


@dataclass(frozen=True)
class Limits:
    memory_mib: int | None = None
    pids: int | None = None


def parse_limits(req: dict[str, Any]) -> Limits | None:
    value = req.get("limits")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise common.BadRequest("'limits' must be an object or null")
    return Limits(
        memory_mib=common.opt_count(value, "memory_mib", 1),
        pids=common.opt_count(value, "pids", 1),
    )


class Cgroups:
    """Makes one group per limited command; refuses when it may not (not PID 1)."""

    def __init__(self, enabled: bool, root: str = CGROUP_ROOT) -> None:
        self._enabled = enabled
        self._root = root
        self._parent = os.path.join(root, PARENT)
        self._prepared = False
        self._ids = itertools.count(1)

    def create(self, limits: Limits) -> Group:
        """A fresh group with `limits` applied; raises RequestError if there can be none."""
        self._prepare()
        path = os.path.join(self._parent, str(next(self._ids)))
        os.mkdir(path)
        try:
            if limits.memory_mib is not None:
                _write(path, "memory.max", str(limits.memory_mib << 20))
                with contextlib.suppress(OSError):  # absent without swap accounting
                    _write(path, "memory.swap.max", "0")
            if limits.pids is not None:
                _write(path, "pids.max", str(limits.pids))
            return Group(path)
        except OSError:
            os.rmdir(path)
            raise

    def _prepare(self) -> None:
        if self._prepared:
            return
        if not self._enabled:
            raise common.RequestError(
                "limits need cgroups, which the agent uses only as PID 1 (it is not)"
            )
        if not os.path.exists(os.path.join(self._root, "cgroup.controllers")):
            raise common.RequestError(f"limits need cgroup v2 mounted at {self._root}")
        try:
            _write(self._root, "cgroup.subtree_control", CONTROLLERS)
            os.makedirs(self._parent, exist_ok=True)
            _write(self._parent, "cgroup.subtree_control", CONTROLLERS)
        except OSError as exc:
            raise common.RequestError(f"cannot enable cgroup controllers: {exc}") from exc
        self._prepared = True


class Group:
    """One command's group: the child joins it, the agent reads its usage and removes it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._procs = os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)

    def join(self) -> None:
        """Runs in the child between fork and exec (preexec_fn): move it into the group."""
        os.write(self._procs, b"0")

    def usage(self) -> tuple[bool, int | None]:
        """Whether the OOM killer struck, and the peak memory in KiB (None if unknown)."""
        events = _read(self.path, "memory.events") or ""
        counts = dict(line.split() for line in events.splitlines() if len(line.split()) == 2)
        limited = int(counts.get("oom_kill", "0")) > 0
        peak = _read(self.path, "memory.peak") or _read(self.path, "memory.current")
        return limited, None if peak is None else int(peak) // 1024

    async def remove(self) -> None:
        """Kills what is left in the group and removes it (gives up after REMOVE_WAIT_S)."""
        with contextlib.suppress(OSError):
            os.close(self._procs)
        with contextlib.suppress(OSError):
            _write(self.path, "cgroup.kill", "1")
        deadline = asyncio.get_running_loop().time() + REMOVE_WAIT_S
        while True:
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError as exc:  # EBUSY while killed processes are still going away
                if asyncio.get_running_loop().time() > deadline:
                    common.log(f"cannot remove cgroup {self.path}: {exc}")
                    return
                await asyncio.sleep(0.02)


def _write(directory: str, name: str, value: str) -> None:
    with open(os.path.join(directory, name), "w", encoding="ascii") as f:
        f.write(value)


def _read(directory: str, name: str) -> str | None:
    try:
        with open(os.path.join(directory, name), encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None
