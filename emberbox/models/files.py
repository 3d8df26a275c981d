"""Files in the guest (``/v1/sandboxes/{id}/files`` and ``/archive``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from emberbox.models.common import GuestPath, PublicModel, RequestModel

FileType = Literal["file", "dir", "symlink", "other"]


class FileEntry(PublicModel):
    """A file in the guest, as the guest's own ``lstat`` sees it."""

    name: str
    path: str
    type: FileType
    size: int
    mode: int = Field(description="Permission bits (st_mode & 0o7777).")
    mtime: float = Field(description="Unix time, guest clock.")


class FileList(PublicModel):
    path: str
    entries: list[FileEntry]


class MakeDir(RequestModel):
    path: GuestPath
    parents: bool = Field(default=True, description="Create missing parents too (mkdir -p).")
    mode: int = Field(default=0o755, ge=0, le=0o7777)


class FileWritten(PublicModel):
    path: str
    size: int = Field(description="Bytes written.")


class ArchiveWritten(PublicModel):
    path: str
    entries: int = Field(description="Members extracted.")
