"""envd over plain HTTP and the filesystem service: ``/health``, ``/files`` both ways
(PROTOCOL.md 2.2) and ``filesystem.Filesystem`` Stat, ListDir, MakeDir, Move, Remove.

Uploads stream into ``manager.files.write`` (never whole in memory) after the parent
directory is made as the user; then the file is given to the user (mode 0644).
"""

from __future__ import annotations

import posixpath
import zlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from starlette.datastructures import UploadFile
from starlette.responses import JSONResponse, Response, StreamingResponse

from emberbox import errors
from emberbox.agent_client.spec import ExecSpec
from emberbox.e2b import fsops, users
from emberbox.e2b.connect import error_answer, unary
from emberbox.e2b.front import EnvdCall, api_error, envd_call

router = APIRouter(include_in_schema=False)
fs_router = APIRouter(prefix="/filesystem.Filesystem", include_in_schema=False)

CHUNK = 256 * 1024
STATUS_ERRORS = {404: 404, 400: 400, 403: 403, 413: 413, 507: 507}


def _files_error(exc: errors.EmberboxError) -> Response:
    """envd's /files errors: ``{"code": <int>, "message"}``."""
    if exc.status_code == 502 and "was not found" in exc.message:
        return api_error(502, exc.message)
    if isinstance(exc, errors.Unauthorized):
        return api_error(401, exc.message)
    return api_error(STATUS_ERRORS.get(exc.status_code, 500), exc.message)


@router.get("/health")
async def health(request: Request) -> Response:
    try:
        await envd_call(request)
    except errors.EmberboxError as exc:
        return _files_error(exc)
    return Response(status_code=204)


@router.get("/files")
async def download(request: Request) -> Response:
    try:
        call = await envd_call(request)
        user = users.named(request.query_params.get("username"))
        path = user.resolve(request.query_params.get("path"))
        info = await call.front.manager.files.stat(call.sandbox_id, path)
        if info.type == "dir":
            raise errors.InvalidRequest(f"{path} is a directory")
        if info.type == "symlink":
            answer = await fsops.run(call, user, "stat", path=path)
            if answer["entry"]["type"] == "FILE_TYPE_DIRECTORY":
                raise errors.InvalidRequest(f"{path} is a directory")
        chunks = call.front.manager.files.read(call.sandbox_id, path)
        first = await anext(chunks, b"")
    except errors.EmberboxError as exc:
        return _files_error(exc)

    async def body() -> AsyncIterator[bytes]:
        yield first
        async for chunk in chunks:
            yield chunk

    return StreamingResponse(body(), media_type="application/octet-stream")


async def _gunzip(data: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    async for chunk in data:
        out = inflater.decompress(chunk)
        if out:
            yield out
    tail = inflater.flush()
    if tail:
        yield tail


async def _upload_file(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(CHUNK):
        yield chunk


async def write_as(
    call: EnvdCall, user: users.User, path: str, data: AsyncIterator[bytes]
) -> dict[str, Any]:
    """Write ``data`` to ``path`` as ``user``: parents made by the user, the file the
    user's with mode 0644. Returns E2B's upload entry."""
    manager = call.front.manager
    parent = posixpath.dirname(path) or "/"
    made = await manager.exec(
        call.sandbox_id,
        ExecSpec(user.wrap(["mkdir", "-p", "--", parent]), env=user.env(), cwd="/"),
    )
    if made.exit_code != 0:
        message = made.stderr.decode(errors="replace").strip()[-300:]
        raise fsops.PermissionDenied(message or f"cannot create {parent}")
    await manager.files.write(call.sandbox_id, path, data, mode=0o644)
    if user.uid != 0:
        owner = f"{user.uid}:{user.uid}"
        await manager.exec(call.sandbox_id, ExecSpec(["chown", "-h", owner, "--", path], cwd="/"))
    return {"name": posixpath.basename(path), "type": "file", "path": path}


# A raw upload (BodyGuard gives it only the body deadline; manager.files.write counts
# the bytes against max_upload_bytes).
STREAMED_BODY: dict[str, Any] = {"requestBody": {"content": {"application/octet-stream": {}}}}


@router.post("/files", openapi_extra=STREAMED_BODY)
async def upload(request: Request) -> Response:
    try:
        call = await envd_call(request)
        user = users.named(request.query_params.get("username"))
        target = request.query_params.get("path")
        kind = request.headers.get("content-type", "")
        written: list[dict[str, Any]] = []
        if kind.startswith("multipart/form-data"):
            async with request.form(max_files=10_000) as form:
                for _, part in form.multi_items():
                    if not isinstance(part, UploadFile):
                        continue
                    name = part.filename or target
                    path = user.resolve(name if part.filename else target)
                    written.append(await write_as(call, user, path, _upload_file(part)))
        else:
            if not target:
                raise errors.InvalidRequest("path is required for a raw upload")
            data: AsyncIterator[bytes] = request.stream()
            if request.headers.get("content-encoding", "").lower() == "gzip":
                data = _gunzip(data)
            written.append(await write_as(call, user, user.resolve(target), data))
    except zlib.error as exc:
        return api_error(400, f"the gzip body is corrupt: {exc}")
    except errors.EmberboxError as exc:
        return _files_error(exc)
    return JSONResponse(written)


# -- filesystem.Filesystem -----------------------------------------------------------------


def _path(body: dict[str, Any], request: Request, key: str = "path") -> tuple[users.User, str]:
    user = users.from_authorization(request.headers.get("authorization"))
    value = body.get(key)
    if not isinstance(value, str):
        raise errors.InvalidRequest(f"{key} is required")
    return user, user.resolve(value)


async def _stat(call: EnvdCall, body: dict[str, Any], request: Request) -> dict[str, Any]:
    user, path = _path(body, request)
    return {"entry": (await fsops.run(call, user, "stat", path=path))["entry"]}


async def _list_dir(call: EnvdCall, body: dict[str, Any], request: Request) -> dict[str, Any]:
    user, path = _path(body, request)
    depth = body.get("depth") or 1
    answer = await fsops.run(call, user, "list", path=path, depth=int(depth))
    return {"entries": answer["entries"]}


async def _make_dir(call: EnvdCall, body: dict[str, Any], request: Request) -> dict[str, Any]:
    user, path = _path(body, request)
    answer = await fsops.run(call, user, "mkdir", path=path)
    if answer.get("exists"):
        raise errors.Conflict(f"{path} already exists")
    return {"entry": answer["entry"]}


async def _move(call: EnvdCall, body: dict[str, Any], request: Request) -> dict[str, Any]:
    user, source = _path(body, request, "source")
    _, destination = _path(body, request, "destination")
    answer = await fsops.run(
        call, user, "move", path=source, source=source, destination=destination
    )
    return {"entry": answer["entry"]}


async def _remove(call: EnvdCall, body: dict[str, Any], request: Request) -> dict[str, Any]:
    user, path = _path(body, request)
    await fsops.run(call, user, "remove", path=path)
    return {}


@fs_router.post("/Stat")
async def stat(request: Request) -> Response:
    return await unary(request, _stat)


@fs_router.post("/ListDir")
async def list_dir(request: Request) -> Response:
    return await unary(request, _list_dir)


@fs_router.post("/MakeDir")
async def make_dir(request: Request) -> Response:
    return await unary(request, _make_dir)


@fs_router.post("/Move")
async def move(request: Request) -> Response:
    return await unary(request, _move)


@fs_router.post("/Remove")
async def remove(request: Request) -> Response:
    return await unary(request, _remove)


__all__ = ["error_answer", "fs_router", "router"]
