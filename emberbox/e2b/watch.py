"""envd's directory watchers: ``WatchDir`` (a stream, the async SDK) and
``CreateWatcher`` / ``GetWatcherEvents`` / ``RemoveWatcher`` (polled, the sync SDK).

A watcher is a background process in the guest, as the calling user: a small
standard-library program (:data:`WATCHER`) on Linux inotify (through ctypes) that writes
one JSON line per event, to its stdout (a stream) or to a file the host reads on each
``GetWatcherEvents`` (polled). It first writes ``{"ready": true}`` once its watches are
in place, so no event after the call returned is missed.

Uploads land under a temporary name and are renamed into place: the watcher hides the
temporary name and reports the rename into place as CREATE then WRITE (new content).
"""

from __future__ import annotations

import json
import posixpath
import secrets
from typing import Any

import anyio
from fastapi import APIRouter, Request
from starlette.responses import Response

from emberbox import errors
from emberbox.agent_client.spec import SpawnSpec
from emberbox.e2b import fsops, users
from emberbox.e2b.connect import Emit, EnvelopeStream, error_answer, stream_request, unary
from emberbox.e2b.front import EnvdCall

router = APIRouter(prefix="/filesystem.Filesystem", include_in_schema=False)

READY_WAIT_S = 300.0
WATCH_DIR = "/tmp"  # where polled watchers write their events (.e2b-watch-<id>.jsonl)
KEEPALIVE: dict[str, Any] = {"keepalive": {}}

WATCHER = (
    fsops.ENTRY
    + r"""
import ctypes, json, re, struct, sys
HIDDEN = re.compile(r"\..*\.[0-9a-f]{8}\.upload")  # emberbox's upload temp files
root, recursive, out = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
entries = len(sys.argv) > 4 and sys.argv[4] == "1"
sink = sys.stdout if out == "-" else open(out, "a")
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.inotify_init1(0)
MASK = 0x2 | 0x4 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400  # modify attrib moved create delete
dirs = {}
def add(path):
    wd = libc.inotify_add_watch(fd, path.encode(), MASK)
    if wd >= 0: dirs[wd] = path
    if recursive:
        for name in sorted(os.listdir(path)):
            child = os.path.join(path, name)
            if os.path.isdir(child) and not os.path.islink(child): add(child)
def emit(event):  # (``name`` is ENTRY's owner-name helper: never a variable here)
    if entries and "name" in event:
        try: event["entry"] = entry(os.path.join(root, event["name"]))
        except OSError: pass
    sink.write(json.dumps(event) + "\n"); sink.flush()
if not os.path.isdir(root): emit({"error": "not_found"}); sys.exit(1)
add(root); emit({"ready": True})
KINDS = ((0x100 | 0x80, "EVENT_TYPE_CREATE"), (0x2, "EVENT_TYPE_WRITE"),
         (0x200, "EVENT_TYPE_REMOVE"), (0x40, "EVENT_TYPE_RENAME"), (0x4, "EVENT_TYPE_CHMOD"))
while True:
    data = os.read(fd, 65536); at = 0
    while at < len(data):
        wd, mask, _, size = struct.unpack_from("iIII", data, at)
        leaf = data[at + 16: at + 16 + size].rstrip(b"\0").decode(errors="replace")
        at += 16 + size
        base = dirs.get(wd)
        if base is None or not leaf: continue
        full = os.path.join(base, leaf)
        if mask & 0x40000000 and mask & (0x100 | 0x80) and recursive: add(full)
        if HIDDEN.fullmatch(leaf): continue
        for bit, kind in KINDS:
            if mask & bit: emit({"name": os.path.relpath(full, root), "type": kind})
        if mask & 0x80: emit({"name": os.path.relpath(full, root), "type": "EVENT_TYPE_WRITE"})
"""
)


def _spec(user: users.User, path: str, recursive: bool, out: str, entries: bool) -> SpawnSpec:
    flags = ["1" if recursive else "0", out, "1" if entries else "0"]
    argv = ["python3", "-I", "-S", "-u", "-c", WATCHER, path, *flags]
    return SpawnSpec(argv, env=user.env(), cwd="/", user=user.run_as())


def _event(event: dict[str, Any]) -> dict[str, Any]:
    """A watcher's line as E2B's FilesystemEvent (with its EntryInfo when asked for)."""
    out = {"name": event["name"], "type": event["type"]}
    if isinstance(event.get("entry"), dict):
        out["entry"] = event["entry"]
    return out


async def _directory(call: EnvdCall, user: users.User, path: str) -> None:
    entry = (await fsops.run(call, user, "stat", path=path))["entry"]
    if entry["type"] != "FILE_TYPE_DIRECTORY":
        raise errors.InvalidRequest(f"{path} is not a directory")


def _target(body: dict[str, Any], request: Request) -> tuple[users.User, str, bool, bool]:
    """Who watches, the directory, recursive, and whether events carry the entry."""
    user = users.from_authorization(request.headers.get("authorization"))
    path = body.get("path")
    if not isinstance(path, str):
        raise errors.InvalidRequest("path is required")
    entries = bool(body.get("includeEntry", body.get("include_entry")))
    return user, user.resolve(path), bool(body.get("recursive")), entries


@router.post("/WatchDir")
async def watch_dir(request: Request) -> Response:
    try:
        call, body = await stream_request(request)
        user, path, recursive, entries = _target(body, request)
        await _directory(call, user, path)
        pid = await call.front.manager.processes.spawn(
            call.sandbox_id, _spec(user, path, recursive, "-", entries)
        )
    except errors.EmberboxError as exc:
        return error_answer(exc)
    processes = call.front.manager.processes

    async def produce(emit: Emit) -> None:
        pending = bytearray()

        async def lines(chunk: bytes) -> None:
            pending.extend(chunk)
            while b"\n" in pending:
                line, _, rest = bytes(pending).partition(b"\n")
                pending[:] = rest
                event = json.loads(line)
                if event.get("ready"):
                    await emit({"start": {}})
                elif "name" in event:
                    await emit({"filesystem": _event(event)})

        try:
            await processes.follow(call.sandbox_id, pid, on_stdout=lines)
        finally:
            await processes.end(call.sandbox_id, pid)

    return EnvelopeStream(produce, KEEPALIVE)


async def _create(call: EnvdCall, body: dict[str, Any], request: Request) -> dict[str, Any]:
    user, path, recursive, entries = _target(body, request)
    await _directory(call, user, path)
    watcher_id = secrets.token_hex(8)
    out = posixpath.join(WATCH_DIR, f".e2b-watch-{watcher_id}.jsonl")
    pid = await call.front.manager.processes.spawn(
        call.sandbox_id, _spec(user, path, recursive, out, entries)
    )
    call.front.watchers[(call.sandbox_id, watcher_id)] = [pid, out, 0]
    if not await _ready(call, pid, out):
        raise errors.AgentRequestFailed(f"the watcher of {path} did not start")
    call.front.watchers[(call.sandbox_id, watcher_id)][2] = 1  # past the ready line
    return {"watcherId": watcher_id}


async def _ready(call: EnvdCall, pid: int, out: str) -> bool:
    """Whether the watcher wrote its ready line: waited for while it runs (slow under
    load is not stuck), at most READY_WAIT_S."""
    pause = 0.02
    with anyio.move_on_after(READY_WAIT_S):
        while True:
            if await _read_lines(call, out):
                return True
            if not (await call.front.manager.processes.status(call.sandbox_id, pid)).running:
                return bool(await _read_lines(call, out))
            await anyio.sleep(pause)
            pause = min(pause * 1.5, 0.5)
    return False


async def _read_lines(call: EnvdCall, out: str) -> list[str]:
    try:
        chunks = [c async for c in call.front.manager.files.read(call.sandbox_id, out)]
    except errors.NotFound:
        return []
    text = b"".join(chunks).decode(errors="replace")
    return [line for line in text.split("\n")[:-1] if line]


def _watcher(call: EnvdCall, body: dict[str, Any]) -> list[Any]:
    watcher = call.front.watchers.get((call.sandbox_id, str(body.get("watcherId"))))
    if watcher is None:
        raise errors.NotFound(f"no watcher {body.get('watcherId')!r}")
    return watcher


async def _events(call: EnvdCall, body: dict[str, Any], request: Request) -> dict[str, Any]:
    del request
    watcher = _watcher(call, body)
    lines = await _read_lines(call, watcher[1])
    fresh, watcher[2] = lines[watcher[2] :], len(lines)
    events = [json.loads(line) for line in fresh]
    return {"events": [_event(e) for e in events if "name" in e]}


async def _remove(call: EnvdCall, body: dict[str, Any], request: Request) -> dict[str, Any]:
    del request
    watcher = _watcher(call, body)
    call.front.watchers.pop((call.sandbox_id, str(body.get("watcherId"))), None)
    await call.front.manager.processes.end(call.sandbox_id, watcher[0])
    await call.front.manager.files.remove(call.sandbox_id, watcher[1])
    return {}


@router.post("/CreateWatcher")
async def create_watcher(request: Request) -> Response:
    return await unary(request, _create)


@router.post("/GetWatcherEvents")
async def get_watcher_events(request: Request) -> Response:
    return await unary(request, _events)


@router.post("/RemoveWatcher")
async def remove_watcher(request: Request) -> Response:
    return await unary(request, _remove)
