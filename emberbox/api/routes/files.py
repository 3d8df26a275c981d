"""``/v1/sandboxes/{id}/files`` and ``/archive``: files in the guest, streamed both ways.

Paths are the guest's: resolved by its kernel (relative to ``/``, through its symlinks
and ``..``); the server never opens them on the host. Bodies stream: a download is
written as the guest reads it, an upload is sent on as it arrives, and one larger than
``max_upload_bytes`` is refused with 413 (up front when it has a Content-Length).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, Query, Request, Response

from emberbox import errors
from emberbox.api import views
from emberbox.api.deps import FilesDep
from emberbox.api.errors import error_responses
from emberbox.api.routes.processes import RAW_BODY, content_length
from emberbox.api.routes.sandboxes import SandboxId
from emberbox.api.streams import (
    BINARY_SCHEMA,
    OCTET_STREAM,
    StreamedResponse,
    Write,
    streamed_content,
)
from emberbox.models import ArchiveWritten, FileEntry, FileList, FileWritten, GuestPath, MakeDir

if TYPE_CHECKING:
    from emberbox.agent_client.client import FileInfo
    from emberbox.service.guestio.files import SandboxFiles

router = APIRouter(prefix="/v1/sandboxes/{sandbox_id}", tags=["files"])

PathQuery = Annotated[GuestPath, Query(description="Path in the guest (relative: from /)")]
ModeQuery = Annotated[
    str | None,
    Query(
        pattern=r"^(0o?)?[0-7]{1,4}$",
        description="Permission bits in octal (`644`, `0755`); default: the old file's, or 644",
    ),
]
TAR = "application/x-tar"


@router.get(
    "/files",
    response_model=FileList,
    responses={
        200: {"content": {OCTET_STREAM: {"schema": BINARY_SCHEMA}}},
        **error_responses(400, 404, 409, 422, 502),
    },
)
async def read_path(
    sandbox_id: SandboxId, path: PathQuery, files: FilesDep
) -> FileList | StreamedResponse:
    """A file's bytes (`application/octet-stream`, streamed), or a directory's listing."""
    info = await files.stat(sandbox_id, path)
    entries = await _listing(files, sandbox_id, path, info.type)
    if entries is not None:
        return FileList(path=path, entries=[views.file_entry(e) for e in entries])
    if info.type == "other":
        raise errors.InvalidRequest(f"{path} is not a regular file or a directory", path=path)

    async def produce(write: Write) -> None:
        async with contextlib.aclosing(files.read(sandbox_id, path)) as chunks:
            async for chunk in chunks:
                await write(chunk)

    return StreamedResponse(produce)


async def _listing(
    files: SandboxFiles, sandbox_id: str, path: str, kind: str
) -> list[FileInfo] | None:
    """A directory's entries; None for anything else. A symlink is what it leads to."""
    if kind not in ("dir", "symlink"):
        return None
    try:
        return await files.list(sandbox_id, path)
    except errors.InvalidRequest:  # a symlink to a file
        if kind == "dir":
            raise
        return None


@router.put(
    "/files",
    response_model=FileWritten,
    responses=error_responses(400, 404, 409, 413, 422, 502),
    openapi_extra=RAW_BODY,
)
async def write_file(
    sandbox_id: SandboxId,
    path: PathQuery,
    request: Request,
    files: FilesDep,
    mode: ModeQuery = None,
) -> FileWritten:
    """Write the raw request body to the file `path` (replaced whole, once complete)."""
    size = content_length(request)
    files.check_upload_size(size)
    written = await files.write(sandbox_id, path, request.stream(), mode=_octal(mode), size=size)
    return FileWritten(path=path, size=written)


@router.delete(
    "/files",
    status_code=204,
    response_class=Response,
    responses=error_responses(400, 404, 409, 422, 502),
)
async def remove_path(
    sandbox_id: SandboxId,
    path: PathQuery,
    files: FilesDep,
    recursive: Annotated[bool, Query(description="Remove a directory and its contents")] = False,
) -> Response:
    """Remove a file or an empty directory (a whole tree with `recursive=true`)."""
    await files.remove(sandbox_id, path, recursive=recursive)
    return Response(status_code=204)


@router.post(
    "/files/mkdir",
    status_code=204,
    response_class=Response,
    responses=error_responses(400, 404, 409, 422, 502),
)
async def make_dir(sandbox_id: SandboxId, body: MakeDir, files: FilesDep) -> Response:
    """Create a directory (with its parents unless `parents` is false)."""
    await files.make_dir(sandbox_id, body.path, parents=body.parents, mode=body.mode)
    return Response(status_code=204)


@router.get(
    "/files/stat", response_model=FileEntry, responses=error_responses(400, 404, 409, 422, 502)
)
async def stat_path(sandbox_id: SandboxId, path: PathQuery, files: FilesDep) -> FileEntry:
    """What is at `path` (not following a final symlink): type, size, mode, mtime."""
    return views.file_entry(await files.stat(sandbox_id, path))


@router.get(
    "/archive",
    response_class=StreamedResponse,
    responses={**streamed_content(TAR, BINARY_SCHEMA), **error_responses(400, 404, 409, 422, 502)},
)
async def download_archive(
    sandbox_id: SandboxId, path: PathQuery, files: FilesDep
) -> StreamedResponse:
    """A directory (or a file) as a POSIX tar stream (`application/x-tar`)."""
    await files.stat(sandbox_id, path)  # 404 while we still can say so

    async def produce(write: Write) -> None:
        async with contextlib.aclosing(files.tar_out(sandbox_id, path)) as chunks:
            async for chunk in chunks:
                await write(chunk)

    return StreamedResponse(produce, media_type=TAR)


@router.put(
    "/archive",
    response_model=ArchiveWritten,
    responses=error_responses(400, 404, 409, 413, 422, 502),
    openapi_extra={
        "requestBody": {"content": {TAR: {"schema": {"type": "string", "format": "binary"}}}}
    },
)
async def upload_archive(
    sandbox_id: SandboxId, path: PathQuery, request: Request, files: FilesDep
) -> ArchiveWritten:
    """Extract the tar body into the directory `path` (made if missing), member by
    member. A member with an absolute name, `..`, a path through a link or a device file
    is refused (400) before it is written; members before it stay extracted, and nothing
    is ever written through a link."""
    size = content_length(request)
    files.check_upload_size(size)
    entries = await files.tar_in(sandbox_id, path, request.stream(), size=size)
    return ArchiveWritten(path=path, entries=entries)


def _octal(mode: str | None) -> int | None:
    return None if mode is None else int(mode.removeprefix("0o"), 8)
