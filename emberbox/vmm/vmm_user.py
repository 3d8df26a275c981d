"""The unprivileged user QEMU runs as (``EMBERBOX_VMM_USER``, default ``emberbox-vmm``).

A root server starts each QEMU as that user; QEMU gets every host file as an already
open descriptor, so the user needs no access to the data or cache dirs at all (they stay
root-only). ``scripts/setup.sh`` creates it. A server that is not root runs QEMU as itself.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from emberbox.errors import HostError

KVM = Path("/dev/kvm")


@dataclass(frozen=True)
class VmmUser:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary groups (e.g. kvm)


def resolve(name: str, euid: int | None = None) -> VmmUser | None:
    """The user to drop to, or None (no name configured, or we are not root)."""
    if not name or (os.geteuid() if euid is None else euid) != 0:
        return None
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise HostError(
            f"the VMM user {name!r} does not exist: create it with `useradd --system "
            f"--no-create-home --shell /usr/sbin/nologin {name}` (scripts/setup.sh does), "
            "or set EMBERBOX_VMM_USER= to run QEMU as root"
        ) from None
    if entry.pw_uid == 0:
        raise HostError(f"the VMM user {name!r} is root: pick an unprivileged user")
    groups = tuple(g for g in os.getgrouplist(name, entry.pw_gid) if g != entry.pw_gid)
    return VmmUser(name, entry.pw_uid, entry.pw_gid, groups)


def can_read_write(path: Path, user: VmmUser) -> bool:
    """Whether ``user`` may open ``path`` read-write, judged by its mode bits (the check
    the kernel makes; ACLs and LSMs aside)."""
    try:
        info = path.stat()
    except OSError:
        return False
    need = stat.S_IRUSR | stat.S_IWUSR
    if info.st_uid == user.uid:
        return info.st_mode & need == need
    if info.st_gid == user.gid or info.st_gid in user.groups:
        return info.st_mode & (need >> 3) == need >> 3
    return info.st_mode & (need >> 6) == need >> 6


def check_kvm(user: VmmUser, device: Path = KVM) -> None:
    """HostError naming the fix when ``user`` cannot open ``device`` for KVM."""
    if can_read_write(device, user):
        return
    try:
        info = device.stat()
        owner = f"{stat.filemode(info.st_mode)} {_group_name(info.st_gid)}"
    except OSError as exc:
        owner = str(exc)
    raise HostError(
        f"QEMU runs as {user.name!r}, which cannot open {device} ({owner}): add it to the "
        f"kvm group (`usermod -aG kvm {user.name}`, with a udev rule such as "
        '`KERNEL=="kvm", GROUP="kvm", MODE="0660"`), or set EMBERBOX_VMM_USER= to run '
        "QEMU as root"
    )


def _group_name(gid: int) -> str:
    try:
        return f"group {grp.getgrgid(gid).gr_name}"
    except KeyError:
        return f"gid {gid}"
