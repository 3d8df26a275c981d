"""Where a Firecracker VM's files live on the host, and how they are made and removed.

Layout of a VM, all in the directory Firecracker runs in (``work_dir``, or the jail root
under the jailer; ``console.log`` and, without jailer, everything else in ``work_dir``)::

    fc.sock          API socket (``run/firecracker.socket`` in a jail)
    console.log      the process's stdout+stderr: the guest serial console
    firecracker.log  Firecracker's own log          metrics.json   its metrics
    rootfs.ext4      the image's rootfs itself, attached read-only and shared by every VM:
                     a symlink to it (a hard link in a jail, which a symlink cannot leave)
    scratch.ext4     this VM's writable layer: a sparse ext4 made empty at start; the
                     guest's init mounts an overlayfs with it over the read-only rootfs
    vsock.sock       host end of the vsock device: ``CONNECT 1024`` reaches the agent

So nothing the size of the rootfs is copied, at start or at snapshot. A snapshot
directory holds ``vmstate``, ``memory``, ``scratch.ext4`` and ``base.json`` (which
rootfs it was taken over: a restore attaches that same file again). Snapshots made before
the overlay hold a full ``rootfs.ext4`` instead of the last two; they still restore.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from emberbox.errors import HostError, SnapshotMismatch
from emberbox.vmm.base import VMConfig
from emberbox.vmm.firecracker import jailer
from emberbox.vmm.firecracker.jailer import JailerConfig
from emberbox.vmm.host import socket_path_fits

API_SOCKET = "fc.sock"
CONSOLE_LOG = "console.log"
FC_LOG = "firecracker.log"
METRICS = "metrics.json"
ROOTFS = "rootfs.ext4"
SCRATCH = "scratch.ext4"
SNAPSHOT_BASE = "base.json"
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
    costs nothing until the guest writes. Elsewhere only the data extents are read
    (SEEK_DATA / SEEK_HOLE), so a sparse file costs what it holds, not its size, and zero
    blocks within them become holes too.
    """
    with contextlib.suppress(FileNotFoundError):
        dest.unlink()
    with open(src, "rb") as fin, open(dest, "xb", opener=_private_opener) as fout:
        try:
            fcntl.ioctl(fout.fileno(), _FICLONE, fin.fileno())
            return
        except OSError:  # EOPNOTSUPP / EXDEV / EINVAL: no reflinks here
            pass
        size = os.fstat(fin.fileno()).st_size
        for start, end in data_extents(fin.fileno(), size):
            fin.seek(start)
            fout.seek(start)
            left = end - start
            while left > 0 and (chunk := fin.read(min(left, len(_ZERO)))):
                left -= len(chunk)
                if chunk == _ZERO[: len(chunk)]:
                    fout.seek(len(chunk), os.SEEK_CUR)
                else:
                    fout.write(chunk)
        fout.truncate(size)  # a trailing hole still needs the file to have its full size


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The ``(start, end)`` byte ranges of ``fd`` that hold data; the whole file where the
    filesystem cannot tell (no SEEK_DATA)."""
    extents: list[tuple[int, int]] = []
    offset = 0
    try:
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole from offset to the end
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            extents.append((start, end))
            offset = end
    except OSError:  # EINVAL: no SEEK_DATA support here
        return [(0, size)] if size else []
    return extents


def link_base(base: Path, dest: Path, *, jailed: bool) -> None:
    """Make ``dest`` name the read-only base rootfs ``base`` without copying it.

    A symlink outside a jail. A jailed Firecracker cannot follow one out of its chroot,
    so there a hard link (which shares the base's owner and mode: never chown it); on
    another filesystem than the jail, a full copy is the only way in (see
    docs/firecracker.md: keep the jails beside the images).
    """
    with contextlib.suppress(FileNotFoundError):
        dest.unlink()
    if jailed:
        jailer.link_or_copy(base, dest)
    else:
        dest.symlink_to(base.absolute())


def make_scratch(path: Path, size_mib: int, mkfs: str = "mkfs.ext4") -> None:
    """An empty ext4 of ``size_mib`` in a new sparse file (about a megabyte of it written).

    No journal (the layer lives and dies with its VM; a snapshot is taken paused, with the
    device quiet) and lazily initialised inode tables (the guest mounts it with
    ``noinit_itable``, so nothing zeroes them later either).
    """
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    with open(path, "xb", opener=_private_opener) as f:
        f.truncate(size_mib << 20)
    argv = [
        mkfs, "-F", "-q", "-m", "0", "-L", "emberbox-scratch", "-O", "^has_journal",
        "-E", "lazy_itable_init=1,lazy_journal_init=1", str(path),
    ]  # fmt: skip
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except FileNotFoundError as exc:
        raise HostError(f"{mkfs} not found: install the e2fsprogs package", binary=mkfs) from exc
    except subprocess.TimeoutExpired as exc:
        raise HostError(f"{mkfs} did not finish within 60 s on {path}") from exc
    if proc.returncode != 0:
        raise HostError(f"{mkfs} failed on {path}: {proc.stderr.strip()[-500:]}")


def base_identity(base: Path) -> dict[str, object]:
    """What tells one base rootfs from another, as recorded beside a snapshot."""
    st = base.stat()
    return {"path": str(base.absolute()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def write_base_record(dest: Path, base: Path) -> None:
    (dest / SNAPSHOT_BASE).write_text(json.dumps(base_identity(base)) + "\n")


def check_base_record(snapshot_dir: Path, base: Path) -> None:
    """SnapshotMismatch unless ``base`` is the rootfs the snapshot was taken over (a
    scratch layer means nothing over another one)."""
    record = snapshot_dir / SNAPSHOT_BASE
    try:
        saved = json.loads(record.read_text())
        want = (saved["size"], saved["mtime_ns"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SnapshotMismatch(
            f"snapshot {snapshot_dir} has no readable {SNAPSHOT_BASE}: {exc}",
            snapshot=str(snapshot_dir),
        ) from exc
    try:
        have = base_identity(base)
    except OSError as exc:
        raise HostError(f"missing file {base}", path=str(base)) from exc
    if (have["size"], have["mtime_ns"]) != want:
        raise SnapshotMismatch(
            f"snapshot {snapshot_dir} was taken over the rootfs {saved.get('path')!r} as it "
            f"was then; {base} is another file (or was rebuilt since)",
            snapshot=str(snapshot_dir),
        )


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
