"""Files of running sandboxes (``manager.files``): stat, list, read, write, remove, make
directories, and move whole trees as tar streams.

Every path is resolved by the guest, as its own kernel does it: relative to ``/``,
through the guest's symlinks and ``..``. The host never opens a guest path, so nothing
on the host is reachable through one.

Bytes stream through: a read or an upload is never whole in the server's memory. An
upload to a new or regular file lands under a temporary name next to it and is renamed
into place once complete, so a failed or refused (HTTP 413) upload leaves the old file
as it was. Writing to a symlink or a device writes through it, in place.
"""

from __future__ import annotations

import builtins
import contextlib
import posixpath
import secrets
from collections.abc import AsyncGenerator, AsyncIterable
from typing import TYPE_CHECKING

import anyio

from emberbox import errors
from emberbox.service.guestio.common import GuestService, checked_path, close_iterator
from emberbox.service.sandboxes import storage

if TYPE_CHECKING:
    from emberbox.agent_client.calls import AgentCalls
    from emberbox.agent_client.client import FileInfo

DEFAULT_FILE_MODE = 0o644


class SandboxFiles(GuestService):
    """The files of the manager's running sandboxes."""

    async def stat(self, sandbox_id: str, path: str) -> FileInfo:
        """What the guest's ``lstat`` says of ``path``; NotFound when nothing is there."""
        path = checked_path(path)
        async with self._guest(sandbox_id) as (_, agent):
            return await agent.stat(path)

    async def list(self, sandbox_id: str, path: str) -> builtins.list[FileInfo]:
        """The entries of a directory, sorted by name."""
        path = checked_path(path)
        async with self._guest(sandbox_id) as (_, agent):
            return await agent.list_dir(path)

    async def read(self, sandbox_id: str, path: str) -> AsyncGenerator[bytes, None]:
        """The file's bytes in chunks (of at most 64 KiB) as the guest sends them."""
        path = checked_path(path)
        async with self._guest(sandbox_id) as (_, agent):
            chunks = agent.read_file(path)
            try:
                async for chunk in chunks:
                    yield chunk
            finally:
                await close_iterator(chunks)

    async def write(
        self,
        sandbox_id: str,
        path: str,
        data: AsyncIterable[bytes],
        *,
        mode: int | None = None,
        size: int | None = None,
    ) -> int:
        """Write the file ``path`` from ``data`` as it comes; returns the bytes written.

        ``mode`` (default: an existing file's, else 0o644) applies to the new file.
        ``size``, when the caller knows it, is checked against ``max_upload_bytes``
        before anything is sent; the bytes are counted too (QuotaExceeded, HTTP 413).
        """
        path = checked_path(path)
        parent, name = posixpath.split(path)
        if name in ("", ".", ".."):
            raise errors.InvalidRequest(f"path {path!r} names a directory, not a file")
        if mode is not None and not 0 <= mode <= 0o7777:
            raise errors.InvalidRequest(f"mode must be from 0 to 0o7777 (got {mode!r})")
        self.check_upload_size(size)
        await storage.require_free_space(self._settings, "an upload")
        counted = self._counted(data)
        async with self._guest(sandbox_id) as (_, agent):
            existing = await _existing(agent, path)
            if existing is not None and existing.type == "dir":
                raise errors.InvalidRequest(f"{path} is a directory", path=path)
            if existing is not None and existing.type != "file":
                # A symlink or a device: write through it, as open(2) would.
                written = await agent.write_file(path, counted, mode=mode or DEFAULT_FILE_MODE)
                counted.check()
                return written
            if mode is None:
                mode = existing.mode & 0o7777 if existing is not None else DEFAULT_FILE_MODE
            temp = posixpath.join(parent, f".{name[:64]}.{secrets.token_hex(4)}.upload")
            try:
                written = await agent.write_file(temp, counted, mode=mode)
                counted.check()
                await agent.rename(temp, path)
            except BaseException:
                with anyio.CancelScope(shield=True), contextlib.suppress(errors.EmberboxError):
                    await agent.remove(temp)
                raise
        return written

    async def make_dir(
        self, sandbox_id: str, path: str, *, parents: bool = True, mode: int = 0o755
    ) -> None:
        path = checked_path(path)
        async with self._guest(sandbox_id) as (_, agent):
            await agent.make_dir(path, parents=parents, mode=mode)

    async def remove(self, sandbox_id: str, path: str, *, recursive: bool = False) -> None:
        """Remove a file, an empty directory, or with ``recursive`` a whole tree."""
        path = checked_path(path)
        async with self._guest(sandbox_id) as (_, agent):
            await agent.remove(path, recursive=recursive)

    async def tar_out(self, sandbox_id: str, path: str) -> AsyncGenerator[bytes, None]:
        """A POSIX tar stream of ``path`` (a directory or a file)."""
        path = checked_path(path)
        async with self._guest(sandbox_id) as (_, agent):
            chunks = agent.tar_out(path)
            try:
                async for chunk in chunks:
                    yield chunk
            finally:
                await close_iterator(chunks)

    async def tar_in(
        self, sandbox_id: str, path: str, data: AsyncIterable[bytes], *, size: int | None = None
    ) -> int:
        """Extract a tar stream into the directory ``path`` (made if missing); returns the
        member count. The guest refuses absolute names, ``..``, links leading out and
        devices (InvalidRequest). Past ``max_upload_bytes`` the stream is cut and the
        call raises QuotaExceeded (HTTP 413); members extracted before that stay."""
        path = checked_path(path)
        self.check_upload_size(size)
        await storage.require_free_space(self._settings, "an upload")
        counted = self._counted(data)
        async with self._guest(sandbox_id) as (_, agent):
            try:
                entries = await agent.tar_in(path, counted)
            except errors.EmberboxError:
                counted.check()  # a cut stream is a broken archive: say why it was cut
                raise
        counted.check()
        return entries


async def _existing(agent: AgentCalls, path: str) -> FileInfo | None:
    try:
        return await agent.stat(path)
    except errors.NotFound:
        return None
