"""``tar_out`` and ``tar_in``: directories as POSIX tar streams (standard library only).

``tar_out`` writes the headers with ``tarfile.TarInfo.tobuf`` and streams each file's
bytes itself, so nothing is ever whole in memory and the host's window is honoured.
``tar_in`` lets ``tarfile`` parse the stream (in a worker thread, fed from the
request's STDIN) but extracts every member itself: each is checked before it is
written, and every directory on its way is opened with ``O_NOFOLLOW`` from the
destination down, so no member can land outside it (the guest's Python 3.11.2 has no
``tarfile`` extraction filters).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import stat as st
import tarfile
from typing import IO, Any, cast

from . import common, files, protocol
from .channel import Call

BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE
COPY_CHUNK = files.READ_CHUNK
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


# --- tar_out ---------------------------------------------------------------------------


async def tar_out(req: dict[str, Any], call: Call) -> dict[str, Any]:
    path = common.guest_path(req)
    top = await files.in_thread(path, os.stat, path)
    writer = TarWriter(call)
    if st.S_ISDIR(top.st_mode):
        await writer.add_tree(path, "")
    else:
        await writer.add(path, os.path.basename(path.rstrip("/")) or "file", top)
    await writer.finish()
    return {"ok": True, "bytes": writer.sent}


class TarWriter:
    """Streams tar members to the host: names relative to the archived path."""

    def __init__(self, call: Call) -> None:
        self._call = call
        self._links: dict[tuple[int, int], str] = {}  # (dev, ino) -> first member name
        self.sent = 0

    async def add_tree(self, directory: str, prefix: str) -> None:
        for name, info in await files.in_thread(directory, _entries, directory):
            full = os.path.join(directory, name)
            await self.add(full, prefix + name, info)
            if st.S_ISDIR(info.st_mode):
                await self.add_tree(full, f"{prefix}{name}/")

    async def add(self, path: str, name: str, info: os.stat_result) -> None:
        """One member; sockets, FIFOs and devices are left out."""
        member = tarfile.TarInfo(name)
        member.mode, member.mtime = st.S_IMODE(info.st_mode), int(info.st_mtime)
        member.uid, member.gid = info.st_uid, info.st_gid
        fd = None
        if st.S_ISDIR(info.st_mode):
            member.type = tarfile.DIRTYPE
        elif st.S_ISLNK(info.st_mode):
            try:
                member.type, member.linkname = tarfile.SYMTYPE, os.readlink(path)
            except FileNotFoundError:  # removed since we listed it (/proc/self/fd/N)
                return
        elif st.S_ISREG(info.st_mode) and (info.st_dev, info.st_ino) in self._links:
            member.type, member.linkname = tarfile.LNKTYPE, self._links[info.st_dev, info.st_ino]
        elif st.S_ISREG(info.st_mode):
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            try:
                fd = await files.in_thread(path, os.open, path, flags)
            except common.Missing:  # removed since we listed it
                return
            member.size = info.st_size
            if info.st_nlink > 1:
                self._links[info.st_dev, info.st_ino] = name
        else:
            return
        await self._send(member.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        if fd is not None:
            try:
                await self._send_data(path, fd, member.size)
            finally:
                os.close(fd)

    async def finish(self) -> None:
        """The end-of-archive blocks, padded to a whole record as tar(1) does."""
        end = self.sent + 2 * BLOCK
        await self._send(bytes(2 * BLOCK + (-end % RECORD)))

    async def _send_data(self, path: str, fd: int, size: int) -> None:
        """Exactly `size` bytes (the header's promise: zeros if the file shrank)."""
        left = size
        while left > 0:
            data = await files.in_thread(path, os.read, fd, min(COPY_CHUNK, left))
            data = data or bytes(min(COPY_CHUNK, left))
            await self._send(data)
            left -= len(data)
        await self._send(bytes(-size % BLOCK))

    async def _send(self, data: bytes) -> None:
        for i in range(0, len(data), protocol.DATA_CHUNK):
            await self._call.send(protocol.Kind.STDOUT, data[i : i + protocol.DATA_CHUNK])
        self.sent += len(data)


def _entries(directory: str) -> list[tuple[str, os.stat_result]]:
    found = []
    with os.scandir(directory) as entries:
        for entry in entries:
            try:
                found.append((entry.name, entry.stat(follow_symlinks=False)))
            except FileNotFoundError:
                continue
    return sorted(found)


# --- tar_in ----------------------------------------------------------------------------


async def tar_in(req: dict[str, Any], call: Call) -> dict[str, Any]:
    dest = common.guest_path(req)
    await files.in_thread(dest, os.makedirs, dest, 0o755, True)
    source = CallReader(call, asyncio.get_running_loop())
    try:
        entries = await asyncio.to_thread(extract, cast(IO[bytes], source), dest)
    finally:
        source.abort()  # a worker still waiting for input (we were cancelled) gives up
    while await call.receive():  # what follows the end-of-archive blocks
        pass
    return {"ok": True, "entries": entries}


class CallReader:
    """A blocking file-like reader for a worker thread over a request's STDIN."""

    def __init__(self, call: Call, loop: asyncio.AbstractEventLoop) -> None:
        self._call, self._loop = call, loop
        self._buf = b""
        self._eof = self._aborted = False
        self._pending: concurrent.futures.Future[bytes] | None = None

    def read(self, size: int = -1) -> bytes:
        if not self._buf and not self._eof:
            received = self._call.receive(files.WRITE_BATCH)
            self._pending = asyncio.run_coroutine_threadsafe(received, self._loop)
            if self._aborted:
                self._pending.cancel()
            self._buf = self._pending.result()  # CancelledError once aborted
            self._eof = not self._buf
        size = len(self._buf) if size < 0 else size
        data, self._buf = self._buf[:size], self._buf[size:]
        return data

    def abort(self) -> None:
        self._aborted = True
        if self._pending is not None:
            self._pending.cancel()


def extract(source: IO[bytes], dest: str) -> int:
    """Extracts the tar stream `source` into `dest`; returns the member count."""
    count = 0
    try:
        with tarfile.open(fileobj=source, mode="r|*") as tar, Extractor(dest) as extractor:
            for member in tar:
                count += extractor.extract(member, tar)
    except (tarfile.TarError, EOFError) as exc:
        raise common.BadRequest(f"not a valid tar stream: {exc}") from None
    return count


class Extractor:
    """Creates members under `dest` through directory fds opened with O_NOFOLLOW."""

    def __init__(self, dest: str) -> None:
        self._dest = dest
        self._root = os.open(dest, DIR_FLAGS & ~os.O_NOFOLLOW)

    def __enter__(self) -> Extractor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        os.close(self._root)

    def extract(self, member: tarfile.TarInfo, tar: tarfile.TarFile) -> int:
        """Checks and writes one member; returns 1, or 0 for the root entry (``./``)."""
        parts = member_parts(member.name, member.name)
        if not parts:
            return 0
        if member.ischr() or member.isblk() or member.isfifo():
            raise common.BadRequest(f"member {member.name!r}: device and FIFO entries refused")
        if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
            raise common.BadRequest(f"member {member.name!r}: unsupported type {member.type!r}")
        parent = self._walk(parts[:-1], member.name, create=True)
        try:
            self._create(parent, parts[-1], member, tar)
        except OSError as exc:
            raise common.os_error(exc, os.path.join(self._dest, *parts)) from None
        finally:
            self._close(parent)
        return 1

    def _create(
        self, parent: int, name: str, member: tarfile.TarInfo, tar: tarfile.TarFile
    ) -> None:
        if member.isdir():
            self._make_dir(parent, name, member.mode)
            return
        _unlink_non_dir(parent, name, member.name)
        if member.issym():
            os.symlink(member.linkname, name, dir_fd=parent)
        elif member.islnk():
            self._link(parent, name, member)
        else:
            self._write_file(parent, name, member, tar)

    def _walk(self, parts: list[str], member: str, create: bool) -> int:
        """An fd on the directory `parts` below dest; refuses symlinks and non-directories."""
        fd = self._root
        for part in parts:
            try:
                try:
                    child = os.open(part, DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(part, 0o755, dir_fd=fd)
                    child = os.open(part, DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                self._close(fd)
                if isinstance(exc, FileNotFoundError):
                    raise common.BadRequest(f"member {member!r}: link target missing") from None
                raise common.BadRequest(
                    f"member {member!r} goes through a symlink or a non-directory: {part}"
                ) from None
            self._close(fd)
            fd = child
        return fd

    def _make_dir(self, parent: int, name: str, mode: int) -> None:
        try:
            os.mkdir(name, 0o700, dir_fd=parent)
        except FileExistsError:
            if not st.S_ISDIR(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
                os.unlink(name, dir_fd=parent)  # as tar(1) does
                os.mkdir(name, 0o700, dir_fd=parent)
        fd = os.open(name, DIR_FLAGS, dir_fd=parent)
        try:
            os.fchmod(fd, st.S_IMODE(mode))
        finally:
            os.close(fd)

    def _link(self, parent: int, name: str, member: tarfile.TarInfo) -> None:
        target = member_parts(member.linkname, member.name)
        if not target:
            raise common.BadRequest(f"member {member.name!r}: hard link to the destination")
        source = self._walk(target[:-1], member.name, create=False)
        try:
            os.link(target[-1], name, src_dir_fd=source, dst_dir_fd=parent, follow_symlinks=False)
        finally:
            self._close(source)

    def _write_file(
        self, parent: int, name: str, member: tarfile.TarInfo, tar: tarfile.TarFile
    ) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(name, flags, 0o600, dir_fd=parent)
        try:
            data = tar.extractfile(member)
            if data is not None:
                while chunk := data.read(COPY_CHUNK):
                    files.write_all(fd, chunk)
            os.fchmod(fd, st.S_IMODE(member.mode))
            os.utime(fd, (member.mtime, member.mtime))
        finally:
            os.close(fd)

    def _close(self, fd: int) -> None:
        if fd != self._root:
            os.close(fd)


def member_parts(name: str, member: str) -> list[str]:
    """The path components of a member name or hard link target; refuses escapes."""
    if name.startswith("/"):
        raise common.BadRequest(f"member {member!r}: absolute path {name!r} refused")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise common.BadRequest(f"member {member!r}: '..' in {name!r} refused")
    return parts


def _unlink_non_dir(parent: int, name: str, member: str) -> None:
    """Makes room for a file, link or symlink (never writing through what was there)."""
    try:
        mode = os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return
    if st.S_ISDIR(mode):
        raise common.Clash(f"member {member!r}: a directory is in the way")
    os.unlink(name, dir_fd=parent)
