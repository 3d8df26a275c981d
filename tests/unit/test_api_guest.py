"""The HTTP layer of streamed exec, background processes, files and terminals, over the
real process and file services and a fake guest: status codes, NDJSON framing, OpenAPI."""

from __future__ import annotations

import base64
import io
import json
import tarfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from emberbox import errors
from emberbox.api import create_app
from emberbox.api.streams import OutputEvents, split_utf8
from emberbox.config import Settings
from emberbox.models import OutputEvent
from tests.support.fakes_manager import FakeManager, FakeRegistry
from tests.support.servers import serving

pytestmark = pytest.mark.anyio

LIMIT = 64 * 1024  # max_upload_bytes of these tests


@pytest.fixture
def anyio_backend() -> str:
    """Run async tests on asyncio only."""
    return "asyncio"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings in the test's temp dir, with a small upload limit."""
    return Settings(data_dir=tmp_path / "d", cache_dir=tmp_path / "c", max_upload_bytes=LIMIT)


@pytest.fixture
def manager(settings: Settings, tmp_path: Path) -> FakeManager:
    """An in-memory manager whose process and file calls are the real services."""
    return FakeManager(settings, FakeRegistry(tmp_path / "images"))


@pytest.fixture
def app(settings: Settings, manager: FakeManager) -> FastAPI:
    """The real app over the fakes."""
    return create_app(settings, manager, registry=manager.registry)  # type: ignore[arg-type]


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client talking to the app in-process."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://emberbox") as c:
        yield c


async def _sandbox(client: httpx.AsyncClient) -> str:
    response = await client.post("/v1/sandboxes", json={"env": {"FROM_SANDBOX": "1"}})
    assert response.status_code == 201, response.text
    sandbox_id: str = response.json()["id"]
    return sandbox_id


def _error(response: httpx.Response, status: int, type_name: str) -> str:
    assert response.status_code == status, response.text
    assert response.json()["error"]["type"] == type_name, response.text
    message: str = response.json()["error"]["message"]
    return message


def _events(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-ndjson"
    assert response.text.endswith("\n")
    return [json.loads(line) for line in response.text.splitlines()]


# --- streamed exec -----------------------------------------------------------------------


async def test_exec_stream_answers_ndjson_events(client: httpx.AsyncClient) -> None:
    """ "stream": true answers one event per line: output (invalid UTF-8 also as base64),
    then the exit event."""
    sandbox_id = await _sandbox(client)
    body = {"cmd": "echo hi", "stream": True}
    events = _events(await client.post(f"/v1/sandboxes/{sandbox_id}/exec", json=body))
    assert events[0] == {"type": "stdout", "data": f"ran echo hi in {sandbox_id}\n"}
    assert events[1] == {"type": "stderr", "data": "err\ufffd\n", "data_b64": "ZXJy/wo="}
    assert base64.b64decode(events[1]["data_b64"]) == b"err\xff\n"
    exit_event = events[-1]
    assert exit_event["type"] == "exit"
    assert (exit_event["exit_code"], exit_event["timed_out"]) == (0, False)
    assert exit_event["duration_ms"] == 1.5


async def test_exec_stream_refusals_are_status_codes(
    client: httpx.AsyncClient, manager: FakeManager
) -> None:
    """404, 409 and 422 come as status codes before any event; a failure after the stream
    began is its last event, with the error's class."""
    sandbox_id = await _sandbox(client)
    stream = {"cmd": "true", "stream": True}
    _error(await client.post("/v1/sandboxes/nope/exec", json=stream), 404, "NotFound")
    body = {"cmd": "true", "stream": "yes please"}
    _error(await client.post(f"/v1/sandboxes/{sandbox_id}/exec", json=body), 422, "ValidationError")
    manager.raise_on_exec = errors.VMMCrashed("qemu died", console_tail="panic")
    events = _events(await client.post(f"/v1/sandboxes/{sandbox_id}/exec", json=stream))
    assert events == [
        {
            "type": "error",
            "error": {"type": "VMMCrashed", "message": "qemu died", "console_tail": "panic"},
        }
    ]
    await client.delete(f"/v1/sandboxes/{sandbox_id}")
    _error(await client.post(f"/v1/sandboxes/{sandbox_id}/exec", json=stream), 409, "Conflict")


def test_split_utf8_keeps_characters_whole() -> None:
    """A chunk ending inside a multi-byte character holds those bytes back."""
    euro = "€".encode()  # three bytes
    assert split_utf8(b"ab" + euro[:1]) == (b"ab", euro[:1])
    assert split_utf8(b"ab" + euro[:2]) == (b"ab", euro[:2])
    assert split_utf8(b"ab" + euro) == (b"ab" + euro, b"")
    assert split_utf8(b"\xff") == (b"\xff", b"")
    assert split_utf8("😀".encode()[:3]) == (b"", "😀".encode()[:3])


async def test_output_events_never_split_a_character() -> None:
    """Chunks cut mid-character become events of whole characters, without base64."""
    lines: list[bytes] = []

    async def write(data: bytes) -> None:
        lines.append(data)

    events = OutputEvents(write)
    data = "héllo €uro".encode()
    for i in range(len(data)):
        await events.stdout(data[i : i + 1])
    await events.stderr(b"\xe2\x82")  # a truncated character at the very end
    await events.flush()
    decoded = [OutputEvent.model_validate_json(line) for line in lines]
    stdout = [e for e in decoded if e.type == "stdout"]
    assert "".join(e.data for e in stdout) == "héllo €uro"
    assert all(e.data_b64 is None for e in stdout)
    assert decoded[-1].raw() == b"\xe2\x82"
    assert decoded[-1].data_b64 is not None


# --- processes ---------------------------------------------------------------------------


async def _start(client: httpx.AsyncClient, sandbox_id: str, **body: Any) -> int:
    response = await client.post(f"/v1/sandboxes/{sandbox_id}/processes", json=body)
    assert response.status_code == 201, response.text
    pid: int = response.json()["pid"]
    return pid


async def test_process_start_list_status_and_output(
    client: httpx.AsyncClient, manager: FakeManager
) -> None:
    """A started process is listed, has a status, and its output replays as NDJSON."""
    sandbox_id = await _sandbox(client)
    pid = await _start(client, sandbox_id, cmd=["echo", "hi"], env={"A": "1"})
    guest = manager.guests[sandbox_id]
    assert guest.processes[pid].env == {"FROM_SANDBOX": "1", "A": "1"}
    listed = (await client.get(f"/v1/sandboxes/{sandbox_id}/processes")).json()["processes"]
    assert [(p["pid"], p["cmd"], p["running"], p["pty"]) for p in listed] == [
        (pid, "echo hi", False, False)
    ]
    status = (await client.get(f"/v1/sandboxes/{sandbox_id}/processes/{pid}")).json()
    assert (status["running"], status["exit_code"]) == (False, 0)
    events = _events(await client.get(f"/v1/sandboxes/{sandbox_id}/processes/{pid}/output"))
    assert [e["type"] for e in events] == ["stdout", "stderr", "exit"]
    assert events[0]["data"] == "ran echo hi\n"
    assert events[2]["exit_code"] == 0


async def test_follow_stdin_and_signal(client: httpx.AsyncClient) -> None:
    """Output is followed live while stdin feeds the process; closing stdin ends it; a
    signal ends another."""
    sandbox_id = await _sandbox(client)
    base = f"/v1/sandboxes/{sandbox_id}/processes"
    pid = await _start(client, sandbox_id, cmd="cat")
    followed: list[httpx.Response] = []
    async with anyio.create_task_group() as tg:

        async def follow() -> None:
            followed.append(await client.get(f"{base}/{pid}/output", params={"follow": "true"}))

        tg.start_soon(follow)
        await anyio.sleep(0.05)
        written = await client.post(f"{base}/{pid}/stdin", content=b"one\n")
        assert written.json() == {"written": 4}
        done = await client.post(f"{base}/{pid}/stdin", params={"close": "true"}, content=b"two")
        assert done.json() == {"written": 3}
    events = _events(followed[0])
    assert "".join(e.get("data", "") for e in events) == "one\ntwo"
    assert events[-1]["type"] == "exit"
    sleeper = await _start(client, sandbox_id, cmd="sleep 100")
    signalled = await client.post(f"{base}/{sleeper}/signal", json={"signal": "SIGKILL"})
    assert signalled.status_code == 204
    status = (await client.get(f"{base}/{sleeper}")).json()
    assert (status["running"], status["exit_code"], status["signal"]) == (False, 137, 9)
    _error(await client.post(f"{base}/{sleeper}/signal", json={}), 409, "Conflict")


async def test_output_without_follow_ends_after_the_buffer(client: httpx.AsyncClient) -> None:
    """follow=false on a running process: the buffered output, no exit event."""
    sandbox_id = await _sandbox(client)
    base = f"/v1/sandboxes/{sandbox_id}/processes"
    pid = await _start(client, sandbox_id, cmd="cat")
    await client.post(f"{base}/{pid}/stdin", content=b"kept")
    started = time.monotonic()
    events = _events(await client.get(f"{base}/{pid}/output", params={"follow": "false"}))
    assert events == [{"type": "stdout", "data": "kept"}]
    assert time.monotonic() - started < 5
    assert (await client.get(f"{base}/{pid}")).json()["running"] is True


async def test_resize_forget_and_refusals(client: httpx.AsyncClient, manager: FakeManager) -> None:
    """resize needs a terminal (409); forget needs an ended process (409), then 404;
    unknown pids are 404, bad ones 422, a stopped sandbox 409."""
    sandbox_id = await _sandbox(client)
    base = f"/v1/sandboxes/{sandbox_id}/processes"
    plain = await _start(client, sandbox_id, cmd="sleep 9")
    term = await _start(client, sandbox_id, cmd="sh", pty={"cols": 80, "rows": 24})
    _error(
        await client.post(f"{base}/{plain}/resize", json={"cols": 10, "rows": 5}), 409, "Conflict"
    )
    assert (
        await client.post(f"{base}/{term}/resize", json={"cols": 132, "rows": 43})
    ).status_code == 204
    assert manager.guests[sandbox_id].processes[term].pty == (132, 43)
    _error(
        await client.post(f"{base}/{term}/resize", json={"cols": 0, "rows": 5}),
        422,
        "ValidationError",
    )
    _error(await client.delete(f"{base}/{plain}"), 409, "Conflict")
    await client.post(f"{base}/{plain}/signal", json={"signal": 15})
    assert (await client.delete(f"{base}/{plain}")).status_code == 204
    _error(await client.get(f"{base}/{plain}"), 404, "NotFound")
    _error(await client.get(f"{base}/{plain}/output"), 404, "NotFound")
    _error(await client.get(f"{base}/0"), 422, "ValidationError")
    _error(
        await client.post(f"{base}/{term}/signal", json={"signal": "rm -rf"}),
        422,
        "ValidationError",
    )
    _error(await client.post(base, json={"cmd": []}), 422, "ValidationError")
    _error(await client.post(base, json={"cmd": "x", "pty": {"cols": 5}}), 422, "ValidationError")
    _error(await client.post("/v1/sandboxes/nope/processes", json={"cmd": "x"}), 404, "NotFound")
    await client.delete(f"/v1/sandboxes/{sandbox_id}")
    _error(await client.get(base), 409, "Conflict")
    _error(await client.post(base, json={"cmd": "x"}), 409, "Conflict")


# --- files -------------------------------------------------------------------------------


async def test_file_round_trip_listing_and_stat(
    client: httpx.AsyncClient, manager: FakeManager
) -> None:
    """PUT writes the raw body (through a temp name, renamed into place), GET reads it
    back as bytes; a directory answers its JSON listing; paths are the guest's."""
    sandbox_id = await _sandbox(client)
    files = f"/v1/sandboxes/{sandbox_id}/files"
    data = bytes(range(256)) * 8
    put = await client.put(files, params={"path": "tmp/../tmp/a.bin", "mode": "600"}, content=data)
    assert put.json() == {"path": "tmp/../tmp/a.bin", "size": len(data)}
    guest = manager.guests[sandbox_id]
    assert guest.files["/tmp/a.bin"] == data
    assert guest.modes["/tmp/a.bin"] == 0o600
    assert [c.split()[0] for c in guest.calls] == ["write", "rename"]
    got = await client.get(files, params={"path": "/tmp/a.bin"})
    assert (got.status_code, got.content) == (200, data)
    assert got.headers["content-type"] == "application/octet-stream"
    listing = (await client.get(files, params={"path": "/tmp"})).json()
    assert listing["path"] == "/tmp"
    assert [(e["name"], e["type"], e["size"], e["mode"]) for e in listing["entries"]] == [
        ("a.bin", "file", len(data), 0o600)
    ]
    again = await client.put(files, params={"path": "/tmp/a.bin"}, content=b"new")
    assert again.status_code == 200
    assert guest.modes["/tmp/a.bin"] == 0o600  # an existing file keeps its mode
    stat = (await client.get(f"{files}/stat", params={"path": "/tmp/a.bin"})).json()
    assert (stat["type"], stat["size"]) == ("file", 3)
    assert sorted(guest.files) == ["/etc/hostname", "/tmp/a.bin"]  # no temp file left


async def test_file_refusals(client: httpx.AsyncClient) -> None:
    """Missing paths are 404; a directory is not a file (400); bad modes and paths 422."""
    sandbox_id = await _sandbox(client)
    files = f"/v1/sandboxes/{sandbox_id}/files"
    _error(await client.get(files, params={"path": "/nope"}), 404, "NotFound")
    _error(await client.get(f"{files}/stat", params={"path": "/nope"}), 404, "NotFound")
    _error(await client.put(files, params={"path": "/no/dir/x"}, content=b"x"), 404, "NotFound")
    _error(await client.put(files, params={"path": "/tmp"}, content=b"x"), 400, "InvalidRequest")
    _error(await client.put(files, params={"path": "/tmp/"}, content=b"x"), 400, "InvalidRequest")
    _error(
        await client.put(files, params={"path": "/tmp/x", "mode": "999"}), 422, "ValidationError"
    )
    _error(await client.get(files, params={"path": ""}), 422, "ValidationError")
    _error(await client.get(files), 422, "ValidationError")
    _error(await client.get(files, params={"path": "a\x00b"}), 422, "ValidationError")
    _error(await client.delete(files, params={"path": "/nope"}), 404, "NotFound")


async def test_mkdir_remove_and_recursive(client: httpx.AsyncClient, manager: FakeManager) -> None:
    """mkdir makes parents; remove refuses a full directory unless recursive."""
    sandbox_id = await _sandbox(client)
    files = f"/v1/sandboxes/{sandbox_id}/files"
    made = await client.post(f"{files}/mkdir", json={"path": "/srv/a/b"})
    assert made.status_code == 204
    await client.put(files, params={"path": "/srv/a/b/f"}, content=b"x")
    _error(await client.delete(files, params={"path": "/srv"}), 400, "InvalidRequest")
    gone = await client.delete(files, params={"path": "/srv", "recursive": "true"})
    assert gone.status_code == 204
    assert "/srv/a/b/f" not in manager.guests[sandbox_id].files
    body = {"path": "/x/y", "parents": False}
    _error(await client.post(f"{files}/mkdir", json=body), 404, "NotFound")


async def test_upload_limit_is_413_before_anything_is_stored(
    client: httpx.AsyncClient, manager: FakeManager
) -> None:
    """Past max_upload_bytes: 413 up front with a Content-Length, or once counted for a
    chunked body; the old file stays, no temp file is left."""
    sandbox_id = await _sandbox(client)
    files = f"/v1/sandboxes/{sandbox_id}/files"
    guest = manager.guests[sandbox_id]
    await client.put(files, params={"path": "/tmp/keep"}, content=b"old")
    big = b"x" * (LIMIT + 1)
    response = await client.put(files, params={"path": "/tmp/keep"}, content=big)
    assert "max_upload_bytes" in _error(response, 413, "PayloadTooLarge")
    assert len(guest.calls) == 2  # the first upload's write and rename: nothing since

    async def chunked() -> AsyncIterator[bytes]:
        for _ in range(LIMIT // 1000 + 2):
            yield b"y" * 1000

    response = await client.put(files, params={"path": "/tmp/keep"}, content=chunked())
    _error(response, 413, "PayloadTooLarge")
    assert guest.files["/tmp/keep"] == b"old"
    assert sorted(guest.files) == ["/etc/hostname", "/tmp/keep"]
    archive = f"/v1/sandboxes/{sandbox_id}/archive"
    _error(await client.put(archive, params={"path": "/a"}, content=big), 413, "PayloadTooLarge")
    pid = await _start(client, sandbox_id, cmd="cat")
    stdin = f"/v1/sandboxes/{sandbox_id}/processes/{pid}/stdin"
    _error(await client.post(stdin, content=big), 413, "PayloadTooLarge")


def _tar(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


async def test_archive_in_and_out(client: httpx.AsyncClient, manager: FakeManager) -> None:
    """PUT /archive extracts a tar into a directory; GET /archive streams one back; a
    member climbing out with .. is refused (400)."""
    sandbox_id = await _sandbox(client)
    archive = f"/v1/sandboxes/{sandbox_id}/archive"
    body = _tar({"a.txt": b"A", "sub/b.txt": b"B"})
    put = await client.put(archive, params={"path": "/srv/app"}, content=body)
    assert put.json() == {"path": "/srv/app", "entries": 2}
    assert manager.guests[sandbox_id].files["/srv/app/sub/b.txt"] == b"B"
    got = await client.get(archive, params={"path": "/srv/app"})
    assert got.headers["content-type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(got.content)) as tar:
        names = {m.name: m for m in tar.getmembers()}
        assert {"a.txt", "sub", "sub/b.txt"} <= set(names)
        extracted = tar.extractfile(names["sub/b.txt"])
        assert extracted is not None
        assert extracted.read() == b"B"
    bad = _tar({"../../etc/evil": b"x"})
    _error(await client.put(archive, params={"path": "/srv"}, content=bad), 400, "InvalidRequest")
    _error(await client.get(archive, params={"path": "/nope"}), 404, "NotFound")


# --- terminals ---------------------------------------------------------------------------


def _wait_until(predicate: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _ws_url(url: str, sandbox_id: str, query: str = "") -> str:
    return url.replace("http://", "ws://") + f"/v1/sandboxes/{sandbox_id}/pty{query}"


def _closed_code(ws: ClientConnection) -> int | None:
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=5)
    return closed.value.rcvd.code if closed.value.rcvd else None


def test_pty_websocket_relays_bytes_and_resizes(app: FastAPI, manager: FakeManager) -> None:
    """Binary frames both ways; a resize text frame resizes; leaving ends the program."""
    with serving(app) as url:
        sandbox_id = httpx.post(f"{url}/v1/sandboxes", json={}).json()["id"]
        guest = manager.guests[sandbox_id]
        with connect(_ws_url(url, sandbox_id, "?cols=100&rows=30")) as ws:
            started = json.loads(ws.recv(timeout=5))
            assert started["type"] == "started"
            pid = started["pid"]
            assert guest.processes[pid].pty == (100, 30)
            ws.send(b"ls\r")
            assert ws.recv(timeout=5) == b"ls\r"
            ws.send(json.dumps({"type": "resize", "cols": 120, "rows": 40}))
            _wait_until(lambda: guest.resizes == [(pid, 120, 40)])
        _wait_until(lambda: pid not in guest.processes)
        assert (pid, "KILL") in guest.signals
        with connect(_ws_url(url, sandbox_id)) as ws:
            pid = json.loads(ws.recv(timeout=5))["pid"]
            ws.send("not json")
            assert json.loads(ws.recv(timeout=5))["error"]["type"] == "InvalidRequest"
            assert _closed_code(ws) == 4400
        _wait_until(lambda: pid not in guest.processes)


def test_pty_program_exit_closes_with_its_status(app: FastAPI, manager: FakeManager) -> None:
    """When the program ends the server sends its exit event and closes normally."""
    with serving(app) as url:
        sandbox_id = httpx.post(f"{url}/v1/sandboxes", json={}).json()["id"]
        with connect(_ws_url(url, sandbox_id)) as ws:
            pid = json.loads(ws.recv(timeout=5))["pid"]
            assert manager.guests[sandbox_id].processes[pid].pty == (80, 24)
            ws.send(b"exit 7")
            assert ws.recv(timeout=5) == b"exit 7"
            assert json.loads(ws.recv(timeout=5)) == {
                "type": "exit",
                "exit_code": 7,
                "signal": None,
                "duration_ms": 12.5,
                "timed_out": False,
                "output_truncated": False,
                "memory_limited": False,
            }
            assert _closed_code(ws) == 1000


def test_pty_errors_close_with_4000_plus_status(tmp_path: Path, manager: FakeManager) -> None:
    """An unknown sandbox closes with 4404 after an error frame; a wrong key with 4401."""
    keyed = Settings(data_dir=tmp_path / "k", api_key="s3cret")
    app = create_app(keyed, manager, registry=manager.registry)  # type: ignore[arg-type]
    with serving(app) as url:
        headers = {"Authorization": "Bearer s3cret"}
        with connect(_ws_url(url, "nope"), additional_headers=headers) as ws:
            assert json.loads(ws.recv(timeout=5))["error"]["type"] == "NotFound"
            assert _closed_code(ws) == 4404
        with connect(_ws_url(url, "nope")) as ws:
            assert json.loads(ws.recv(timeout=5))["error"]["type"] == "Unauthorized"
            assert _closed_code(ws) == 4401


# --- OpenAPI -----------------------------------------------------------------------------


async def test_openapi_lists_the_new_routes(client: httpx.AsyncClient) -> None:
    """The process and file routes are documented, streams with their media types."""
    spec = (await client.get("/openapi.json")).json()
    paths = spec["paths"]
    base = "/v1/sandboxes/{sandbox_id}"
    assert set(paths[f"{base}/processes"]) == {"get", "post"}
    assert set(paths[f"{base}/processes/{{pid}}"]) == {"get", "delete"}
    for action in ("output", "stdin", "signal", "resize"):
        assert f"{base}/processes/{{pid}}/{action}" in paths
    assert set(paths[f"{base}/files"]) == {"get", "put", "delete"}
    assert set(paths[f"{base}/archive"]) == {"get", "put"}
    assert {f"{base}/files/mkdir", f"{base}/files/stat"} <= set(paths)
    output = paths[f"{base}/processes/{{pid}}/output"]["get"]["responses"]
    assert "application/x-ndjson" in output["200"]["content"]
    assert "application/x-ndjson" in paths[f"{base}/exec"]["post"]["responses"]["200"]["content"]
    assert "413" in paths[f"{base}/files"]["put"]["responses"]
    assert "application/x-tar" in paths[f"{base}/archive"]["get"]["responses"]["200"]["content"]
    assert {"OutputEvent", "ExitEvent", "ErrorEvent"} <= set(spec["components"]["schemas"])
