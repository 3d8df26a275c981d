"""The host side of QEMU's files: everything is opened here and handed over as fds.

QEMU runs as an unprivileged user (:mod:`emberbox.vmm.vmm_user`) that cannot even
traverse the data and cache dirs. So before each spawn the host binds and listens on the
VM's unix sockets (0600, in its 0700 work dir), opens the kernel and initrd read-only,
the overlay read-write and every backing layer read-only, and the RAM file; QEMU
inherits exactly these descriptors (see :mod:`emberbox.vmm.qemu.argv`).

The one file QEMU can write outside its overlay is a template's RAM file: QEMU 7.2 opens
``mem-path`` read-write even for a private (``share=off``) mapping, so the file must be
writable by the VMM user and is chowned to it. A compromised clone's QEMU could thus
alter the RAM that later clones of the same template start from. QEMU >= 8.1
(``rom=off``) could map a read-only file instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import stat
import subprocess
from pathlib import Path

from emberbox.errors import HostError, QuotaExceeded, VMMError
from emberbox.vmm.base import VMConfig
from emberbox.vmm.qemu import qcow2
from emberbox.vmm.qemu.argv import DiskLayer, HostFds, QemuPaths, overlay_argv
from emberbox.vmm.vmm_user import VmmUser

SOCKET_MODE = 0o600
WORK_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600  # overlays and saved disks


class HostFiles:
    """The descriptors opened for one QEMU. Close them once QEMU is spawned: QEMU keeps
    its own copies, and a listening socket must close with QEMU so that a client of a
    dead VM gets a reset instead of waiting forever."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self.pass_fds: list[int] = []

    def _keep(self, fd: int) -> int:
        self._stack.callback(os.close, fd)
        self.pass_fds.append(fd)
        return fd

    def open(self, path: Path, flags: int) -> int:
        return self._keep(os.open(path, flags | os.O_CLOEXEC))

    def listen(self, path: Path) -> int:
        """A listening unix socket at ``path``, mode 0600."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._stack.callback(sock.close)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock.bind(str(path))
        os.chmod(path, SOCKET_MODE)  # the 0700 work dir already hides it meanwhile
        sock.listen(4)
        self.pass_fds.append(sock.fileno())
        return sock.fileno()

    def close(self) -> None:
        self._stack.close()


def readable_by(path: Path, user: VmmUser | None) -> bool:
    """Whether ``user`` may re-open ``path`` through ``/proc/self/fd`` (which checks
    the file's own mode, though not the directories above it)."""
    if user is None:
        return True
    info = path.stat()
    if info.st_uid == user.uid:
        return bool(info.st_mode & stat.S_IRUSR)
    if info.st_gid == user.gid or info.st_gid in user.groups:
        return bool(info.st_mode & stat.S_IRGRP)
    return bool(info.st_mode & stat.S_IROTH)


def open_host_files(
    config: VMConfig, *, shared: bool, user: VmmUser | None
) -> tuple[HostFiles, HostFds]:
    """Open everything QEMU needs for ``config``; ``shared``: the RAM file is a new
    template's (created) rather than a clone's (mapped privately)."""
    paths = QemuPaths(config.work_dir)
    files = HostFiles()
    try:
        for boot_file in (config.guest.kernel, config.guest.initrd):
            if not readable_by(boot_file, user):
                raise HostError(f"{boot_file} is not readable by the VMM user: chmod o+r it")
        fds = HostFds(
            qmp=files.listen(paths.qmp),
            agent=files.listen(paths.agent),
            console=files.listen(paths.console),
            kernel=files.open(config.guest.kernel, os.O_RDONLY),
            initrd=files.open(config.guest.initrd, os.O_RDONLY),
            disk=_open_disk(files, paths.overlay, config.disk_roots),
            memory=_open_memory(files, config.memory_file, shared, user),
        )
    except BaseException:
        files.close()
        raise
    return files, fds


def _open_disk(
    files: HostFiles, overlay: Path, roots: tuple[Path, ...] = ()
) -> tuple[DiskLayer, ...]:
    try:
        chain = qcow2.backing_chain(overlay)
    except (OSError, qcow2.Qcow2Error) as exc:
        raise VMMError(f"cannot follow the disk chain of {overlay}: {exc}") from exc
    layers = []
    for index, layer in enumerate(chain):
        if roots and not any(layer.path.is_relative_to(root) for root in roots):
            raise VMMError(f"disk layer {layer.path} is outside emberbox's directories: refused")
        # The overlay's label is its path: it keeps the work dir in QEMU's argv, where
        # attach() and the orphan sweep look for it.
        label = str(layer.path) if index == 0 else f"layer{index}"
        flags = os.O_RDWR if index == 0 else os.O_RDONLY
        fd = _open_layer(files, layer.path, flags, recorded=index > 0)
        layers.append(DiskLayer(fd, layer.format, label))
    return tuple(layers)


def _open_layer(files: HostFiles, path: Path, flags: int, *, recorded: bool) -> int:
    """A disk layer, never through a symlink: O_NOFOLLOW for the last component, and a
    recorded layer (resolved when recorded) must still resolve to itself."""
    if recorded and os.path.realpath(path) != str(path):
        raise VMMError(f"disk layer {path} goes through a symlink: refused")
    try:
        fd = files.open(path, flags | os.O_NOFOLLOW)
    except OSError as exc:
        raise VMMError(f"cannot open disk layer {path}: {exc}") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        raise VMMError(f"disk layer {path} is not a regular file: refused")
    return fd


def _open_memory(
    files: HostFiles, memory_file: Path | None, shared: bool, user: VmmUser | None
) -> int | None:
    if memory_file is None:
        return None
    if shared:  # a new template: QEMU sizes the file and writes the guest's RAM to it
        fd = files.open(memory_file, os.O_RDWR | os.O_CREAT)
    else:  # a clone: QEMU re-opens it read-write (7.2) but maps it copy-on-write
        fd = files.open(memory_file, os.O_RDONLY)
    if user is not None and os.fstat(fd).st_uid != user.uid:
        os.fchown(fd, user.uid, user.gid)
    os.fchmod(fd, 0o600)
    return fd


def make_work_dir(work_dir: Path) -> None:
    work_dir.mkdir(parents=True, exist_ok=True, mode=WORK_DIR_MODE)
    work_dir.chmod(WORK_DIR_MODE)


# A fresh overlay is a few hundred KiB that depend only on its backing file (qemu-img
# writes no time or id into it): the first one over a backing comes from qemu-img, and
# later ones are copies of its bytes, which saves a process per VM start (8-20 ms).
_FRESH_OVERLAYS: dict[tuple[object, ...], bytes] = {}
_FRESH_OVERLAYS_MAX = 32


def _overlay_key(qemu_img: str, backing: Path, backing_format: str) -> tuple[object, ...]:
    """The backing file as it is now: another file, size or change is another key."""
    st = os.stat(backing)
    return (qemu_img, str(backing), backing_format, st.st_dev, st.st_ino,
            st.st_size, st.st_mtime_ns)  # fmt: skip


async def make_overlay(qemu_img: str, work_dir: Path, backing: Path, backing_format: str) -> None:
    """A new qcow2 overlay in ``work_dir`` over ``backing`` (work dir removed on failure)."""
    make_work_dir(work_dir)
    overlay = QemuPaths(work_dir).overlay
    try:
        key = _overlay_key(qemu_img, backing, backing_format)
    except OSError as exc:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise VMMError(f"cannot read the overlay's backing file {backing}: {exc}") from exc
    fresh = _FRESH_OVERLAYS.get(key)
    if fresh is not None:
        try:
            _write_private(overlay, fresh)
        except OSError as exc:
            shutil.rmtree(work_dir, ignore_errors=True)
            raise VMMError(f"cannot write the overlay {overlay}: {exc}") from exc
    else:
        await _qemu_img_overlay(qemu_img, work_dir, overlay, backing, backing_format)
        if len(_FRESH_OVERLAYS) >= _FRESH_OVERLAYS_MAX:
            _FRESH_OVERLAYS.pop(next(iter(_FRESH_OVERLAYS)))
        with contextlib.suppress(OSError), open(overlay, "rb") as made:  # noqa: ASYNC230
            _FRESH_OVERLAYS[key] = made.read()
    try:  # the chain as we made it: later boots follow this, never the header
        qcow2.write_chain(overlay, backing, backing_format)
    except (OSError, qcow2.Qcow2Error) as exc:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise VMMError(f"cannot record the disk chain of {overlay}: {exc}") from exc


async def _qemu_img_overlay(
    qemu_img: str, work_dir: Path, overlay: Path, backing: Path, backing_format: str
) -> None:
    proc = await asyncio.to_thread(
        subprocess.run,
        overlay_argv(qemu_img, backing, overlay, backing_format),
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise VMMError(f"qemu-img could not create the overlay: {proc.stderr.strip()}")
    # Root's alone: QEMU gets a descriptor, and no other VMM user process can re-open
    # it through /proc/PID/fd (which checks the file's own mode).
    os.chmod(overlay, PRIVATE_FILE_MODE)


def _write_private(path: Path, data: bytes) -> None:
    """``data`` as the new file ``path``, root's alone from the start."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)  # whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def adopt_disk(disk: Path, overlay: Path) -> None:
    """Make a snapshot's ``disk`` (and its chain record) the VM's ``overlay`` (a hard
    link: the snapshot keeps its name)."""
    os.link(disk, overlay)
    os.link(qcow2.chain_record(disk), qcow2.chain_record(overlay))


def keep_disk(overlay: Path, disk: Path, *, move: bool) -> None:
    """Put the VM's ``overlay`` (and its chain record) into a snapshot as ``disk``:
    moved (the VM has ended) or copied (QEMU is stopped and its disk flushed)."""
    if move:
        os.replace(overlay, disk)
    else:
        shutil.copyfile(overlay, disk)
        disk.chmod(PRIVATE_FILE_MODE)
    shutil.copyfile(qcow2.chain_record(overlay), qcow2.chain_record(disk))
    qcow2.chain_record(disk).chmod(PRIVATE_FILE_MODE)


def check_disk_cap(config: VMConfig, max_disk_mib: int | None) -> None:
    """QuotaExceeded unless the overlay's virtual size (all the guest can ever write to
    it) is within ``max_disk_mib`` (default: the image's root filesystem size)."""
    overlay = QemuPaths(config.work_dir).overlay
    size = qcow2.read_header(overlay).virtual_size
    cap = max_disk_mib << 20 if max_disk_mib is not None else config.guest.rootfs.stat().st_size
    if size > cap:
        raise QuotaExceeded(
            f"the sandbox disk would be {size >> 20} MiB, over the {cap >> 20} MiB cap "
            "(EMBERBOX_MAX_DISK_MIB)",
            disk_mib=size >> 20,
            max_disk_mib=cap >> 20,
        )
