"""envd over plain HTTP and the filesystem service: ``/health``, ``/files`` both ways
(PROTOCOL.md 2.2) and ``filesystem.Filesystem`` Stat, ListDir, MakeDir, Move, Remove.

Uploads stream into ``manager.files.write`` (never whole in memory) after the parent
directory is made as the user; then the file is given to the user (mode 0644).
"""

from __future__ import annotations

import json
import posixpath
import zlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import APIRouter, Request
from starlette.datastructures import UploadFile
from starlette.responses import JSONResponse, Response, StreamingResponse

from emberbox import errors
from emberbox.agent_client.spec import ExecSpec
from emberbox.e2b import fsops, users
from emberbox.e2b.connect import error_answer, unary
from emberbox.e2b.front import (
    HELPER_TIMEOUT_S,
    EnvdCall,
    api_error,
    audited,
    cut,
    envd_call,
    retry_after,
)

router = APIRouter(include_in_schema=False)
fs_router = APIRouter(prefix="/filesystem.Filesystem", include_in_schema=False)

CHUNK = 256 * 1024
STATUS_ERRORS = {404: 404, 400: 400, 403: 403, 413: 413, 429: 429, 507: 507}


def _files_error(exc: errors.EmberboxError) -> Response:
    """envd's /files errors: ``{"code": <int>, "message"}``."""
    if exc.status_code == 502 and "was not found" in exc.message:
        return api_error(502, exc.message)
    if isinstance(exc, errors.Unauthorized):
        return api_error(401, exc.message)
    return api_error(STATUS_ERRORS.get(exc.status_code, 500), exc.message, retry_after(exc))


@router.get("/health")
async def health(request: Request) -> Response:
    try:
        await envd_call(request)
    except errors.EmberboxError as exc:
        return _files_error(exc)
    return Response(status_code=204)


# As the user, before a download: is the path (symlinks followed) a readable file?
READABLE = r"""
if [ ! -e "$1" ]; then echo missing
elif [ -d "$1" ]; then echo directory
elif [ ! -r "$1" ]; then echo denied
else echo ok
fi
"""
# As the user, before an upload of $2 into $1: make the parent, then may the user write
# the file (an existing one) or create it (in the parent)?
WRITABLE = r"""
[ -d "$1" ] || mkdir -p -- "$1" || exit 3
if [ -d "$2" ]; then echo "$2 is a directory" >&2; exit 4; fi
if [ -e "$2" ]; then [ -w "$2" ] || { echo "$2: permission denied" >&2; exit 3; }
else [ -w "$1" ] || { echo "$1: permission denied" >&2; exit 3; }
fi
"""
# As root, after an upload: the file given to the user and its metadata as user.e2b.*
# extended attributes (what envd does and reads back in EntryInfo.metadata).
FINISH = r"""
import json, os, sys
path, uid, pairs = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
if uid: os.chown(path, uid, uid, follow_symlinks=False)
for key, value in pairs.items(): os.setxattr(path, "user.e2b." + key, value.encode())
"""
METADATA_PREFIX = "x-metadata-"
TOKEN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-.^_`|~")
GZIP_LEVEL = 1  # downloads: speed over size (the SDK asks for gzip on every read)
GZIP_SAMPLE = 64 * 1024  # the first bytes tried: gzip only a file they show compressible


def _as_user(user: users.User, script: str, *args: str) -> ExecSpec:
    argv = ["sh", "-c", script, "sh", *args]
    return ExecSpec(argv, env=user.env(), cwd="/", timeout_s=HELPER_TIMEOUT_S, user=user.run_as())


async def _check_readable(call: EnvdCall, user: users.User, path: str) -> None:
    """NotFound, InvalidRequest (a directory) or PermissionDenied unless ``user`` may
    read the file ``path``."""
    if user.uid == 0:
        info = await call.front.manager.files.stat(call.sandbox_id, path)
        if info.type == "dir":
            raise errors.InvalidRequest(f"{path} is a directory")
        if info.type != "symlink":
            return
    answer = await call.front.manager.exec(call.sandbox_id, _as_user(user, READABLE, path))
    verdict = answer.stdout.decode(errors="replace").strip()
    if verdict == "missing":  # missing, or behind a directory the user cannot enter
        info = await call.front.manager.files.stat(call.sandbox_id, path)  # NotFound
        if info.type == "symlink" or user.uid == 0:  # a dangling link
            raise errors.NotFound(f"{path}: the link's target does not exist")
        raise fsops.PermissionDenied(f"{path}: permission denied")
    if verdict == "directory":
        raise errors.InvalidRequest(f"{path} is a directory")
    if verdict != "ok":
        raise fsops.PermissionDenied(f"{path}: permission denied")


def accepts_gzip(header: str | None) -> bool:
    """Whether ``Accept-Encoding`` allows gzip (``gzip``, ``*``; not with ``q=0``)."""
    for item in (header or "").lower().split(","):
        coding, _, params = item.strip().partition(";")
        if coding.strip() not in ("gzip", "x-gzip", "*"):
            continue
        q = params.strip().removeprefix("q=").strip() if "q=" in params else "1"
        try:
            return float(q) > 0
        except ValueError:
            return False
    return False


def compressible(sample: bytes) -> bool:
    """Whether gzip pays for a file that starts with ``sample``: the SDK's client offers
    gzip on every download, and random or already compressed bytes only cost CPU."""
    head = sample[:GZIP_SAMPLE]
    return bool(head) and len(zlib.compress(head, GZIP_LEVEL)) < 0.9 * len(head)


async def _gzip(data: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    deflater = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    async for chunk in data:
        out = deflater.compress(chunk)
        if out:
            yield out
    yield deflater.flush()


@router.get("/files")
async def download(request: Request) -> Response:
    try:
        call = await envd_call(request)
        user = users.named(request.query_params.get("username"))
        path = user.resolve(request.query_params.get("path"))
        await _check_readable(call, user, path)
        chunks = call.front.manager.files.read(call.sandbox_id, path)
        first = await anext(chunks, b"")
    except errors.EmberboxError as exc:
        return _files_error(exc)

    async def body() -> AsyncIterator[bytes]:
        yield first
        async for chunk in chunks:
            yield chunk

    if accepts_gzip(request.headers.get("accept-encoding")) and compressible(first):
        headers = {"Content-Encoding": "gzip", "Vary": "Accept-Encoding"}
        compressed = _gzip(body())
        return StreamingResponse(compressed, media_type="application/octet-stream", headers=headers)
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


def upload_metadata(headers: Mapping[str, str]) -> dict[str, str]:
    """``X-Metadata-<Key>: value`` headers as ``{key (lower case): value}``; a key that
    is not an HTTP token or a value that is not printable ASCII is InvalidRequest."""
    found: dict[str, str] = {}
    for name, value in headers.items():
        name = name.lower()
        if not name.startswith(METADATA_PREFIX):
            continue
        key = name[len(METADATA_PREFIX) :]
        if not key or not set(key) <= TOKEN_CHARS or len(key) > 200:
            raise errors.InvalidRequest(f"invalid metadata key {key!r}")
        if not value.isascii() or not value.isprintable() or len(value) > 4096:
            raise errors.InvalidRequest(f"invalid metadata value for key {key!r}")
        found[key] = value
    return found


async def write_as(
    call: EnvdCall,
    user: users.User,
    path: str,
    data: AsyncIterator[bytes],
    metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Write ``data`` to ``path`` as ``user``: the parents made by the user, refused
    (PermissionDenied) where the user may not write, the file the user's with mode 0644
    and ``metadata`` as its ``user.e2b.*`` attributes. Returns E2B's upload entry."""
    manager = call.front.manager
    parent = posixpath.dirname(path) or "/"
    made = await manager.exec(call.sandbox_id, _as_user(user, WRITABLE, parent, path))
    if made.exit_code != 0:
        message = made.stderr.decode(errors="replace").strip()[-300:]
        if made.exit_code == 4:
            raise errors.InvalidRequest(message or f"{path} is a directory")
        raise fsops.PermissionDenied(message or f"cannot write {path}")
    await manager.files.write(call.sandbox_id, path, data, mode=0o644)
    if user.uid != 0 and not metadata:
        owner = f"{user.uid}:{user.uid}"
        chown = ["chown", "-h", owner, "--", path]
        await manager.exec(call.sandbox_id, ExecSpec(chown, cwd="/", timeout_s=HELPER_TIMEOUT_S))
    elif metadata:
        argv = ["python3", "-I", "-S", "-c", FINISH, path, str(user.uid), json.dumps(metadata)]
        done = await manager.exec(
            call.sandbox_id, ExecSpec(argv, cwd="/", timeout_s=HELPER_TIMEOUT_S)
        )
        if done.exit_code != 0:
            tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:]
            raise errors.InvalidRequest(f"cannot store the metadata of {path}: {tail}")
    entry: dict[str, Any] = {"name": posixpath.basename(path), "type": "file", "path": path}
    if metadata:
        entry["metadata"] = metadata
    return entry


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
        metadata = upload_metadata(request.headers)
        size = request.headers.get("content-length")
        shown = {"user": user.name, "bytes": int(size) if size and size.isdigit() else None}
        written: list[dict[str, Any]] = []
        async with audited(call, "e2b.file.write", **shown) as detail:
            if kind.startswith("multipart/form-data"):
                async with request.form(max_files=10_000) as form:
                    for _, part in form.multi_items():
                        if not isinstance(part, UploadFile):
                            continue
                        name = part.filename or target
                        path = user.resolve(name if part.filename else target)
                        detail["paths"] = cut([*detail.get("paths", []), path])
                        entry = await write_as(call, user, path, _upload_file(part), metadata)
                        written.append(entry)
            else:
                if not target:
                    raise errors.InvalidRequest("path is required for a raw upload")
                data: AsyncIterator[bytes] = request.stream()
                if request.headers.get("content-encoding", "").lower() == "gzip":
                    data = _gunzip(data)
                detail["paths"] = [cut(user.resolve(target))]
                written.append(await write_as(call, user, user.resolve(target), data, metadata))
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
    async with audited(call, "e2b.file.mkdir", path=cut(path), user=user.name):
        answer = await fsops.run(call, user, "mkdir", path=path)
        if answer.get("exists"):
            raise errors.Conflict(f"{path} already exists")
    return {"entry": answer["entry"]}


async def _move(call: EnvdCall, body: dict[str, Any], request: Request) -> dict[str, Any]:
    user, source = _path(body, request, "source")
    _, destination = _path(body, request, "destination")
    shown = {"path": cut(source), "destination": cut(destination), "user": user.name}
    async with audited(call, "e2b.file.move", **shown):
        answer = await fsops.run(
            call, user, "move", path=source, source=source, destination=destination
        )
    return {"entry": answer["entry"]}


async def _remove(call: EnvdCall, body: dict[str, Any], request: Request) -> dict[str, Any]:
    user, path = _path(body, request)
    async with audited(call, "e2b.file.remove", path=cut(path), user=user.name):
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
