"""Find and end what sandboxes leave behind: VMM processes, work directories, networks.

A VMM is recognised by its command line, which names files in its work directory
(``<vms_dir>/<sandbox id>/...``). The parsing is pure and unit-tested; the scanning reads
``/proc`` directly. A sandbox's network (namespace, veth, rules) is found by its id
through its record under ``<data_dir>/net`` (the parent of ``vms_dir``). Everything
here blocks: call it from a worker thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import time
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from emberbox.errors import HostError
from emberbox.net import host as nethost
from emberbox.net import plan as netplan
from emberbox.vmm import cgroups
from emberbox.vmm.host import PROC, ProcInfo, read_process

log = logging.getLogger(__name__)

KILL_WAIT_S = 5.0
_PATH_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


@dataclass
class SweepReport:
    """What an orphan sweep ended."""

    killed_pids: list[int] = field(default_factory=list)
    removed_dirs: list[Path] = field(default_factory=list)


# -- pure parsing -------------------------------------------------------------------------


def _occurrences(arg: str, path: str) -> Iterator[int]:
    """Offsets just past each occurrence of ``path`` in ``arg`` that starts on a boundary."""
    start = arg.find(path)
    while start != -1:
        if start == 0 or (arg[start - 1] not in _PATH_CHARS and arg[start - 1] != "/"):
            yield start + len(path)
        start = arg.find(path, start + 1)


def mentions_path(args: Iterable[str], path: Path) -> bool:
    """True if some argument names ``path`` itself or something inside it.

    ``/vms/ab`` matches ``path=/vms/ab/agent.sock`` and ``/vms/ab`` but neither
    ``/vms/abc/x`` nor ``/old/vms/ab``.
    """
    text = str(path).rstrip("/")
    for arg in args:
        for end in _occurrences(arg, text):
            if end == len(arg) or arg[end] not in _PATH_CHARS:
                return True
    return False


def referenced_children(args: Iterable[str], parent: Path) -> set[str]:
    """Names of the entries directly under ``parent`` that the arguments mention."""
    prefix = str(parent).rstrip("/") + "/"
    names: set[str] = set()
    for arg in args:
        for end in _occurrences(arg, prefix):
            stop = end
            while stop < len(arg) and arg[stop] in _PATH_CHARS:
                stop += 1
            name = arg[end:stop]
            if name and name not in {".", ".."}:
                names.add(name)
    return names


def is_under(path: Path, parent: Path) -> bool:
    """True if ``path`` is strictly inside ``parent``.

    Symlinks are resolved in ``path``'s parents but not in its last component, so a
    symlink inside ``parent`` counts as inside (removing it removes the link only).
    """
    if path.name in {"", ".", ".."}:
        return False
    resolved, base = path.parent.resolve() / path.name, parent.resolve()
    return resolved != base and resolved.is_relative_to(base)


# -- /proc --------------------------------------------------------------------------------


def iter_processes(proc: Path = PROC) -> Iterator[ProcInfo]:
    """Every live process we may signal (same uid, or all of them as root), except us."""
    me, my_uid = os.getpid(), os.geteuid()
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        info = read_process(int(entry.name), proc)
        if info is not None and info.args and (my_uid == 0 or info.uid == my_uid):
            yield info


def is_vmm_of(pid: int, work_dir: Path, proc: Path = PROC) -> bool:
    """True if ``pid`` is alive and its command line names ``work_dir``."""
    info = read_process(pid, proc)
    return info is not None and mentions_path(info.args, work_dir)


# -- ending things ------------------------------------------------------------------------


def kill_process(pid: int, work_dir: Path, wait_s: float = KILL_WAIT_S) -> bool:
    """SIGKILL ``pid`` if it still names ``work_dir`` (pid reuse guard), then wait for it.

    A pidfd pins the process between the check and the signal where the kernel has
    them. Our own children are reaped; anyone else's are waited for until they are gone
    or a zombie. False if there was nothing (or something else) at ``pid``.
    """
    try:
        pidfd: int | None = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except OSError:  # no pidfd support (old kernel, seccomp): accept the tiny race
        pidfd = None
    try:
        if not is_vmm_of(pid, work_dir):
            return False
        with contextlib.suppress(ProcessLookupError):
            if pidfd is not None:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
    finally:
        if pidfd is not None:
            os.close(pidfd)
    _wait_gone(pid, wait_s)
    return True


def _wait_gone(pid: int, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        if read_process(pid) is None:
            return
        if time.monotonic() > deadline:
            log.warning("process %d did not end within %.1fs of SIGKILL", pid, wait_s)
            return
        time.sleep(0.01)


def remove_dir(path: Path, vms_dir: Path) -> bool:
    """Remove a sandbox work directory; refuses anything not inside ``vms_dir``."""
    if not is_under(path, vms_dir):
        log.error("refusing to remove %s: not inside %s", path, vms_dir)
        return False
    if path.is_symlink():
        path.unlink()
        return True
    if not path.exists():
        return False
    shutil.rmtree(path)
    return True


def purge(work_dir: Path, vms_dir: Path, pid: int | None = None) -> None:
    """End whatever a sandbox left: its VMM (by pid, then any process naming its work
    directory) and the work directory itself. Idempotent."""
    if pid is not None:
        kill_process(pid, work_dir)
    for info in iter_processes():
        if mentions_path(info.args, work_dir):
            kill_process(info.pid, work_dir)
    remove_dir(work_dir, vms_dir)
    remove_cgroup(work_dir.name)
    remove_network(work_dir.name, vms_dir)


def remove_network(sandbox_id: str, vms_dir: Path, *, keep_record: bool = False) -> None:
    """The sandbox's namespace, veth and rules (after its VMM has ended), and its record
    unless ``keep_record`` (a paused sandbox needs it to resume)."""
    try:
        nethost.remove(netplan.net_dir(vms_dir.parent), sandbox_id, keep_record=keep_record)
    except HostError as exc:
        log.error("could not remove the network of %s: %s", sandbox_id, exc)


def remove_cgroup(name: str) -> None:
    """The host cgroup of VM ``name``, if one is left (its process has ended)."""
    group = cgroups.existing(name)
    if group is not None:
        try:
            group.remove()
        except OSError as exc:
            log.error("could not remove the cgroup of %s: %s", name, exc)


def sweep(vms_dir: Path, owned: Collection[str]) -> SweepReport:
    """Kill every process that names an entry of ``vms_dir`` not in ``owned`` and remove
    every directory of ``vms_dir`` not in ``owned``."""
    report = SweepReport()
    for info in iter_processes():
        strays = referenced_children(info.args, vms_dir) - set(owned)
        for name in sorted(strays):
            if kill_process(info.pid, vms_dir / name):
                log.warning("killed orphan process %d (%s)", info.pid, vms_dir / name)
                report.killed_pids.append(info.pid)
                break
    if vms_dir.is_dir():
        for entry in sorted(vms_dir.iterdir()):
            if entry.name in owned or not (entry.is_dir() or entry.is_symlink()):
                continue
            try:
                if remove_dir(entry, vms_dir):
                    report.removed_dirs.append(entry)
                remove_cgroup(entry.name)
            except OSError as exc:
                log.error("could not remove orphan directory %s: %s", entry, exc)
    # Namespaces of recorded networks no re-attached sandbox owns (their VMMs are gone
    # by now). The records stay: a paused sandbox resumes from its own.
    for sandbox_id in netplan.recorded_ids(netplan.net_dir(vms_dir.parent)):
        if sandbox_id not in owned and nethost.exists(sandbox_id):
            log.warning("removing the orphan network of %s", sandbox_id)
            remove_network(sandbox_id, vms_dir, keep_record=True)
    return report
