"""The file ops: stat, list, read, write, mkdir, remove, rename (standard library only).

Paths are the guest's own: relative ones are taken from ``/`` and the kernel resolves
symlinks as it always does. Blocking calls run in worker threads so that a slow disk
does not stall the loop, and data moves in chunks (never a whole file in memory):
``read`` waits on the host's window, ``write`` acknowledges what it has written.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat as st
from collections.abc import Callable
from typing import Any, TypeVar

from . import common, protocol
from .channel import Call

READ_CHUNK = 4 * protocol.DATA_CHUNK  # bytes per read(2); sent as DATA_CHUNK frames
WRITE_BATCH = 1 << 20  # at most this much STDIN already received goes in one write(2)
T = TypeVar("T")


def file_type(mode: int) -> str:
    if st.S_ISREG(mode):
        return "file"
    if st.S_ISDIR(mode):
        return "dir"
    if st.S_ISLNK(mode):
        return "symlink"
    return "other"


def describe(info: os.stat_result) -> dict[str, Any]:
    """A file as the guest's lstat sees it: type, size, permission bits, mtime."""
    return {
        "type": file_type(info.st_mode),
        "size": info.st_size,
        "mode": st.S_IMODE(info.st_mode),
        "mtime": info.st_mtime,
    }


async def in_thread(path: str, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in a worker thread, an OSError answered as the error it stands for."""
    try:
        return await asyncio.to_thread(fn, *args)
    except OSError as exc:
        raise common.os_error(exc, path) from None


async def stat(req: dict[str, Any], call: Call) -> dict[str, Any]:
    path = common.guest_path(req)
    return {"ok": True, **describe(await in_thread(path, os.lstat, path))}


async def list_dir(req: dict[str, Any], call: Call) -> dict[str, Any]:
    path = common.guest_path(req)
    return {"ok": True, "entries": await in_thread(path, _scan, path)}


def _scan(path: str) -> list[dict[str, Any]]:
    if not st.S_ISDIR(os.stat(path).st_mode):
        raise common.BadRequest(f"Not a directory: {path}")
    entries = []
    with os.scandir(path) as found:
        for entry in found:
            try:
                entries.append({"name": entry.name, **describe(entry.stat(follow_symlinks=False))})
            except FileNotFoundError:  # removed while we listed
                continue
    return sorted(entries, key=lambda e: str(e["name"]))


async def read(req: dict[str, Any], call: Call) -> dict[str, Any]:
    path, offset = common.guest_path(req), common.opt_count(req, "offset") or 0
    left = common.opt_count(req, "length")
    fd, size = await in_thread(path, _open_regular, path, os.O_RDONLY, offset)
    total = 0
    try:
        while left is None or left > 0:
            want = READ_CHUNK if left is None else min(READ_CHUNK, left)
            data = await in_thread(path, os.read, fd, want)
            if not data:
                break
            for i in range(0, len(data), protocol.DATA_CHUNK):
                await call.send(protocol.Kind.STDOUT, data[i : i + protocol.DATA_CHUNK])
            total += len(data)
            left = None if left is None else left - len(data)
    finally:
        os.close(fd)
    return {"ok": True, "size": size, "read": total}


async def write(req: dict[str, Any], call: Call) -> dict[str, Any]:
    path, offset = common.guest_path(req), common.opt_count(req, "offset") or 0
    mode = _mode(req)
    truncate = common.opt_bool(req, "truncate", offset == 0)
    fd, _ = await in_thread(path, _open_regular, path, os.O_WRONLY, offset, mode, truncate)
    written = 0
    try:
        while data := await call.receive(WRITE_BATCH):
            await in_thread(path, write_all, fd, data)
            written += len(data)
    finally:
        os.close(fd)
    return {"ok": True, "written": written}


def _open_regular(
    path: str, flags: int, offset: int, mode: int | None = None, truncate: bool = False
) -> tuple[int, int]:
    """An fd on the regular file `path` at `offset`, and the file's size.

    Writing creates the file (with `mode`, whatever the umask) if it is missing. The
    open is nonblocking so that a FIFO cannot hang it; such files are refused.
    """
    flags |= os.O_CLOEXEC | os.O_NONBLOCK
    created = False
    if flags & os.O_WRONLY:
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            created = True
        except FileExistsError:
            fd = os.open(path, flags)
    else:
        fd = os.open(path, flags)
    try:
        info = os.fstat(fd)
        if not st.S_ISREG(info.st_mode):
            raise common.BadRequest(f"not a regular file ({file_type(info.st_mode)}): {path}")
        os.set_blocking(fd, True)
        if created:
            os.fchmod(fd, 0o644 if mode is None else mode)
        if truncate:
            os.ftruncate(fd, offset)
        os.lseek(fd, offset, os.SEEK_SET)
        return fd, info.st_size
    except BaseException:
        os.close(fd)
        raise


def _mode(req: dict[str, Any]) -> int | None:
    mode = common.opt_count(req, "mode")
    if mode is not None and mode > 0o7777:
        raise common.BadRequest("'mode' must be permission bits (at most 0o7777)")
    return mode


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


async def make_dir(req: dict[str, Any], call: Call) -> dict[str, Any]:
    path, mode = common.guest_path(req), _mode(req)
    parents = common.opt_bool(req, "parents", True)
    await in_thread(path, _make_dir, path, parents, 0o755 if mode is None else mode)
    return {"ok": True}


def _make_dir(path: str, parents: bool, mode: int) -> None:
    if parents and os.path.isdir(path):
        return
    if parents:
        os.makedirs(os.path.dirname(path.rstrip("/")) or "/", exist_ok=True)
    os.mkdir(path)
    os.chmod(path, mode)  # mkdir's mode goes through the umask


async def remove(req: dict[str, Any], call: Call) -> dict[str, Any]:
    path, recursive = common.guest_path(req), common.opt_bool(req, "recursive", False)
    await in_thread(path, _remove, path, recursive)
    return {"ok": True}


def _remove(path: str, recursive: bool) -> None:
    if os.path.normpath(path) == "/":
        raise common.BadRequest("refusing to remove /")
    if not st.S_ISDIR(os.lstat(path).st_mode):
        os.unlink(path)
    elif recursive:
        shutil.rmtree(path)
    else:
        os.rmdir(path)


async def rename(req: dict[str, Any], call: Call) -> dict[str, Any]:
    src, dst = common.guest_path(req, "src"), common.guest_path(req, "dst")
    await in_thread(src, os.rename, src, dst)
    return {"ok": True}
