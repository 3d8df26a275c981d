"""Where a Firecracker VM's files live on the host, and how they are made and removed.

Layout of a VM, all in the directory Firecracker runs in (``work_dir``, or the jail root
under the jailer; ``console.log`` and, without jailer, everything else in ``work_dir``)::

    fc.sock          API socket (``run/firecracker.socket`` in a jail)
    console.log      the process's stdout+stderr: the guest serial console
    firecracker.log  Firecracker's own log          metrics.json   its metrics
    rootfs.ext4      this VM's copy-on-write copy of the image's rootfs (the image is
                     never written)
    vsock.sock       host end of the vsock device: ``CONNECT 1024`` reaches the agent

A snapshot directory holds ``vmstate``, ``memory`` and ``rootfs.ext4``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from emberbox.errors import HostError
from emberbox.vmm.base import VMConfig
from emberbox.vmm.firecracker import jailer
from emberbox.vmm.firecracker.jailer import JailerConfig
from emberbox.vmm.host import socket_path_fits

API_SOCKET = "fc.sock"
CONSOLE_LOG = "console.log"
FC_LOG = "firecracker.log"
METRICS = "metrics.json"
ROOTFS = "rootfs.ext4"
VSOCK = "vsock.sock"
SNAPSHOT_STATE = "vmstate"
SNAPSHOT_MEMORY = "memory"
_FICLONE = 0x40049409
_ZERO = bytes(1 << 16)


@dataclass(frozen=True)
class Layout:
    """Where a VM's files are on the host, and how Firecracker names them."""

    work_dir: Path
    root: Path  # Firecracker's working directory: work_dir, or the jail root
    api_socket: Path  # host path
    api_socket_arg: str  # as passed to --api-sock
    jail: tuple[JailerConfig, str] | None = None  # config and jail id

    @property
    def console(self) -> Path:
        return self.work_dir / CONSOLE_LOG


def layout_for(config: VMConfig, jail: JailerConfig | None) -> Layout:
    """The layout of ``config``'s VM; HostError if a socket path cannot be a unix socket."""
    work_dir = config.work_dir.absolute()
    if jail is None:
        sock = work_dir / API_SOCKET
        layout = Layout(work_dir, work_dir, sock, str(sock))
    else:
        jail_id = jailer.check_jail_id(config.vm_id)
        root = jailer.jail_root(jail, jail_id)
        sock = jailer.api_socket_path(jail, jail_id)
        layout = Layout(work_dir, root, sock, jailer.JAIL_API_SOCKET, (jail, jail_id))
    for path in (layout.api_socket, layout.root / VSOCK):
        if not socket_path_fits(path):
            raise HostError(f"socket path too long for a unix socket: {path}")
    return layout


def make_dirs(layout: Layout) -> None:
    """The private work dir (and jail root), no stale sockets, the logs Firecracker opens."""
    layout.work_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    layout.work_dir.chmod(0o700)
    if layout.jail is not None:
        jailer.make_jail_root(*layout.jail)
    for stale in (layout.api_socket, layout.root / VSOCK):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    for name in (FC_LOG, METRICS):  # Firecracker opens these but does not create them
        (layout.root / name).touch(mode=0o600)


def hand_over(layout: Layout, *names: str) -> None:
    """Give files we made for a jailed Firecracker to its uid (it cannot read ours)."""
    if layout.jail is not None:
        for name in names:
            jailer.give_to_jail(layout.jail[0], layout.root / name)


def remove_vm_files(layout: Layout) -> None:
    """Remove sockets, the work dir and the jail; idempotent."""
    for sock in (layout.api_socket, layout.root / VSOCK):
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
    shutil.rmtree(layout.work_dir, ignore_errors=True)
    if layout.jail is not None:
        jailer.remove_jail(*layout.jail)


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


def private_dir(path: Path) -> Path:
    """``path`` made absolute and created with mode 0700 (with its parents)."""
    path = path.absolute()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def require_files(*paths: Path) -> None:
    """HostError naming the first of ``paths`` that is not a file (a guest image's)."""
    for path in paths:
        if not path.is_file():
            raise HostError(f"missing file {path}", path=str(path))
