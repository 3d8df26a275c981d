"""Who a command runs as: the ``user`` field of ``exec``, ``spawn`` and ``run``
(standard library only).

The agent runs as root. A command with ``"user": {"uid", "gid", "name", "no_new_privs"}``
is switched by the agent's own child between fork and exec: ``setgroups``, ``setgid``,
``setuid`` (by Popen itself, in C; in the preexec_fn, after the cgroup join that needs
root, when the command has a cgroup), then ``PR_SET_NO_NEW_PRIVS`` when asked — what
``setpriv --reuid --regid --init-groups`` did, without a ``setpriv`` process (an exec
and its dynamic linking: ~50 ms under TCG) and in images that have no ``setpriv``
(foreign userlands).

Popen's own switch costs a fork of the agent instead of a vfork (Python will not vfork a
child that changes its ids), 10-20 ms under TCG. So a command with nothing else to do in
its child is started by :func:`as_user` instead: the calling thread alone takes the
user's ids (the kernel's per-thread calls, not glibc's, which change every thread),
vforks the child, which inherits them, and takes root's back. The thread keeps root as
its saved uid, which is what lets it switch back; the child's exec makes its saved uid
its effective one and leaves it no capability (capabilities(7)), so it ends exactly as
after ``setreuid``. The supplementary groups
are ``gid`` and every group of ``/etc/group`` that lists ``name`` (initgroups); none
without a name (``--clear-groups``). ``/etc/group`` is read once and again only when it
changes. The environment is the caller's to set (``HOME``, ``USER``, ``LOGNAME``).

The host sends ``user`` only to an agent whose hello lists ``protocol.FEATURE_USER``;
for older agents it wraps the command itself (``agent_client/spec.py``), so a command
is never run as root by an agent that ignored the field.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from . import common

GROUP_FILE = "/etc/group"
PR_SET_NO_NEW_PRIVS = 38
MAX_ID = 0xFFFFFFFE  # (uid_t)-1 means "unchanged" to the kernel
UNCHANGED = -1
# setgroups, setresuid, setresgid: the raw system calls, which change the calling thread only
THREAD_SYSCALLS = {"x86_64": (116, 117, 119), "aarch64": (159, 147, 149)}


@dataclass(frozen=True)
class RunAs:
    """The identity a command takes before its exec."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    no_new_privs: bool

    @property
    def supplementary(self) -> list[int]:
        """The groups to set: never empty, so that no version of Popen's
        ``extra_groups`` can mistake "none" for "keep root's" (the gid adds no access)."""
        return list(self.groups) or [self.gid]

    def popen_ids(self) -> dict[str, Any]:
        """Popen's own switch (done in C between fork and exec, before any preexec_fn)."""
        return {"user": self.uid, "group": self.gid, "extra_groups": self.supplementary}

    def become(self) -> None:
        """The same switch in a preexec_fn (after joining a cgroup, which needs root)."""
        os.setgroups(self.supplementary)
        os.setgid(self.gid)
        os.setuid(self.uid)


def forbid_new_privs(prctl: Callable[..., int]) -> None:
    """PR_SET_NO_NEW_PRIVS on the calling process (in the child: it needs no privilege)."""
    if prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError("prctl(PR_SET_NO_NEW_PRIVS) failed")


def parse_user(req: dict[str, Any]) -> RunAs | None:
    """The request's ``user`` (None: run as the agent's own user, root)."""
    value = req.get("user")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise common.BadRequest("'user' must be an object {uid, gid, name, no_new_privs}")
    uid, gid = _id(value, "uid"), _id(value, "gid")
    name = common.opt(value, "name", str)
    if name is not None and (not name or any(c in name for c in ":\n\0")):
        raise common.BadRequest(f"'user.name' {name!r} is not a user name")
    groups = GROUPS.of(name, gid) if name else ()
    return RunAs(uid, gid, groups, common.opt_bool(value, "no_new_privs", False))


def _id(value: dict[str, Any], name: str) -> int:
    found = common.count(value, name)
    if found > MAX_ID:
        raise common.BadRequest(f"'user.{name}' must be at most {MAX_ID}")
    return found


def parse_group_members(text: str) -> dict[str, list[int]]:
    """user name -> the gids of the groups that list it, from ``/etc/group`` text."""
    members: dict[str, list[int]] = {}
    for line in text.splitlines():
        parts = line.split(":")
        if len(parts) < 4 or not parts[2].isdigit():
            continue
        for member in filter(None, (m.strip() for m in parts[3].split(","))):
            members.setdefault(member, []).append(int(parts[2]))
    return members


class GroupFile:
    """``/etc/group``'s memberships, re-read only when the file changes (one stat)."""

    def __init__(self, path: str = GROUP_FILE) -> None:
        self._path = path
        self._key: tuple[int, int, int] | None = None
        self._members: dict[str, list[int]] = {}

    def of(self, name: str, gid: int) -> tuple[int, ...]:
        """``gid`` and the groups that list ``name``, as initgroups(3) gives them."""
        self._refresh()
        found = [gid]
        for other in self._members.get(name, []):
            if other not in found:
                found.append(other)
        return tuple(found)

    def _refresh(self) -> None:
        try:
            st = os.stat(self._path)
        except OSError:
            self._key, self._members = None, {}
            return
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key == self._key:
            return
        try:
            with open(self._path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            text = ""
        self._key, self._members = key, parse_group_members(text)


GROUPS = GroupFile()
_prctl: Callable[..., int] | None = None


def prctl() -> Callable[..., int]:
    """libc's prctl, looked up in the agent (not in a forked child) and kept."""
    global _prctl
    if _prctl is None:
        import ctypes

        _prctl = ctypes.CDLL(None, use_errno=True).prctl
    return _prctl


class ThreadIds:
    """The calling thread's ids, switched by raw system calls (libc's ``syscall``)."""

    def __init__(self, machine: str) -> None:
        import ctypes

        self._ctypes = ctypes
        self._syscall = ctypes.CDLL(None, use_errno=True).syscall
        self._setgroups, self._setresuid, self._setresgid = THREAD_SYSCALLS[machine]

    def _call(self, number: int, *args: Any) -> None:
        if self._syscall(number, *args) != 0:
            errno = self._ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))

    def set_groups(self, groups: list[int]) -> None:
        array = (self._ctypes.c_uint * len(groups))(*groups)
        self._call(self._setgroups, len(groups), array)

    def set_gids(self, real: int, effective: int) -> None:
        self._call(self._setresgid, real, effective, UNCHANGED)

    def set_uids(self, real: int, effective: int, saved: int) -> None:
        self._call(self._setresuid, real, effective, saved)


_thread_ids: ThreadIds | None = None


def thread_switch_available() -> bool:
    """Whether :func:`as_user` can work here: a known architecture, the agent as root."""
    return platform.machine() in THREAD_SYSCALLS and os.getresuid() == (0, 0, 0)


@contextlib.contextmanager
def as_user(user: RunAs) -> Iterator[None]:
    """Runs the body with the calling thread (only) as `user`, saved uid root; then root
    again. A child forked or vforked in the body starts as `user`. If the thread cannot
    become root again the agent exits (as PID 1: the guest stops): a thread of the agent
    must not stay someone else."""
    global _thread_ids
    if _thread_ids is None:
        _thread_ids = ThreadIds(platform.machine())
    ids, groups = _thread_ids, os.getgroups()
    ids.set_groups(user.supplementary)
    try:
        ids.set_gids(user.gid, user.gid)
        ids.set_uids(user.uid, user.uid, UNCHANGED)
        yield
    finally:
        try:
            ids.set_uids(0, 0, 0)
            ids.set_gids(0, 0)
            ids.set_groups(groups)
        except OSError as exc:
            common.log(f"cannot take root's ids back: {exc}; exiting")
            os._exit(70)
