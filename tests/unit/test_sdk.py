"""The SDK against the real app (fake manager) served by uvicorn on a free port."""

from __future__ import annotations

import inspect
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import emberbox.sdk as sdk
from emberbox import errors
from emberbox.config import Settings
from emberbox.sdk import (
    AsyncSandbox,
    AsyncSnapshots,
    CommandResult,
    Sandbox,
    SandboxInfo,
    SnapshotInfo,
    Snapshots,
    _calls,
)
from tests.support.fakes_manager import FakeManager, fake_app
from tests.support.servers import serving


@pytest.fixture
def anyio_backend() -> str:
    """Run async tests on asyncio only."""
    return "asyncio"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, FakeManager]]:
    """A live server over a fake manager: (url, manager)."""
    app, manager = fake_app(tmp_path)
    with serving(app) as url:
        yield url, manager


@pytest.fixture
def url(server: tuple[str, FakeManager], monkeypatch: pytest.MonkeyPatch) -> str:
    """The server's URL, also exported as EMBERBOX_URL."""
    monkeypatch.setenv("EMBERBOX_URL", server[0])
    monkeypatch.delenv("EMBERBOX_API_KEY", raising=False)
    return server[0]


@pytest.fixture
def manager(server: tuple[str, FakeManager]) -> FakeManager:
    """The fake manager behind the server."""
    return server[1]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --- the sync client ---------------------------------------------------------------------


def test_sync_lifecycle(url: str, manager: FakeManager) -> None:
    """create, info, run, set_timeout, list and kill on exit, all through HTTP."""
    with Sandbox.create("python", vcpus=2, metadata={"team": "a"}, env={"A": "1"}) as sb:
        info = sb.info()
        assert isinstance(info, SandboxInfo)
        assert (info.id, info.image, info.vcpus, info.state) == (sb.id, "python", 2, "running")
        assert sb.get_info() == info
        result = sb.commands.run(["echo", "hi"], stdin="in:", timeout_s=5)
        assert isinstance(result, CommandResult)
        assert result.stdout == f"in:ran echo hi in {sb.id}\n"
        assert (result.exit_code, result.timed_out) == (0, False)
        assert sb.commands.run("fail").exit_code == 3
        assert sb.set_timeout(900).timeout_s == 900
        assert [s.id for s in Sandbox.list(metadata={"team": "a"})] == [sb.id]
        assert Sandbox.list(metadata={"team": "b"}) == []
    assert manager.records[sb.id].state.value == "stopped"
    assert [s.id for s in Sandbox.list(state="stopped")] == [sb.id]
    sb.kill()  # again: still fine, on a fresh connection
    sb.close()


def test_sync_snapshots_pause_and_resume(url: str, manager: FakeManager) -> None:
    """snapshot, fork, list, get, delete, pause and resume, all through HTTP."""
    with Sandbox.create("python", vcpus=2) as sb:
        snap = sb.snapshot()
        assert isinstance(snap, SnapshotInfo)
        assert (snap.sandbox_id, snap.image, snap.vcpus) == (sb.id, "python", 2)
        assert "path" not in snap.model_dump()
        with Sandbox.create(snapshot_id=snap.id) as fork:
            forked = fork.info()
            assert (forked.snapshot_id, forked.image, forked.vcpus) == (snap.id, "python", 2)
            with pytest.raises(errors.SnapshotMismatch, match="vcpus") as mismatch:
                Sandbox.create(snapshot_id=snap.id, vcpus=1)
            assert isinstance(mismatch.value, errors.Conflict)
            with pytest.raises(errors.Conflict, match=fork.id):
                Snapshots.delete(snap.id)
        assert [s.id for s in Snapshots.list()] == [snap.id]
        assert [s.id for s in Snapshots.list(sb.id)] == [snap.id]
        assert Snapshots.list(sandbox_id=fork.id) == []
        assert Snapshots.get(snap.id) == snap
        assert sb.pause().state == "paused"
        with pytest.raises(errors.Conflict):
            sb.commands.run("true")
        with pytest.raises(errors.Conflict):
            sb.snapshot()
        assert sb.resume().state == "running"
        assert sb.commands.run("true").exit_code == 0
        Snapshots.delete(snap.id)
    assert manager.snapshots == {}
    with pytest.raises(errors.NotFound):
        Snapshots.get(snap.id)
    with pytest.raises(errors.NotFound):
        Snapshots.delete(snap.id)
    with pytest.raises(errors.NotFound):
        Sandbox.create(snapshot_id="snap-nope")
    sb.close()


def test_server_errors_come_back_as_the_same_classes(url: str, manager: FakeManager) -> None:
    """NotFound, ImageNotFound, Conflict and 422s raise the emberbox.errors classes."""
    with pytest.raises(errors.NotFound, match="sb-nope") as not_found:
        Sandbox.connect("sb-nope")
    assert not_found.value.details["status_code"] == 404
    with pytest.raises(errors.ImageNotFound) as missing:
        Sandbox.create("ruby")
    assert (missing.value.name, missing.value.available) == ("ruby", ["default", "python"])
    with pytest.raises(errors.InvalidRequest, match="vcpus"):
        Sandbox.create(vcpus=0)
    sb = Sandbox.create()
    sb.kill()
    with pytest.raises(errors.Conflict):
        sb.commands.run("true")
    manager.raise_on_exec = errors.BootTimeout("no handshake", console_tail="tail")
    with Sandbox.create() as sb2, pytest.raises(errors.BootTimeout) as boot:
        sb2.commands.run("true")
    assert boot.value.console_tail == "tail"
    sb.close()


def test_unreachable_server_is_a_host_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Connection refused raises HostError naming the URL."""
    dead = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("EMBERBOX_URL", dead)
    with pytest.raises(errors.HostError, match=f"cannot reach emberbox at {dead}"):
        Sandbox.create()
    with pytest.raises(errors.HostError, match="cannot reach emberbox"):
        Sandbox.list(url=dead)


def test_exit_does_not_hide_the_blocks_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """When the block raised, a failing kill on exit does not replace its error."""
    monkeypatch.setenv("EMBERBOX_URL", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(KeyError), Sandbox("sb-1"):
        raise KeyError("mine")
    with pytest.raises(errors.HostError), Sandbox("sb-1"):
        pass


def test_url_and_api_key_from_arguments_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EMBERBOX_API_KEY is sent as a Bearer token; an argument beats the environment."""
    keyed = Settings(data_dir=tmp_path / "d", cache_dir=tmp_path / "c", api_key="k1")
    app, _ = fake_app(tmp_path, keyed)
    with serving(app) as url:
        monkeypatch.setenv("EMBERBOX_URL", url)
        monkeypatch.delenv("EMBERBOX_API_KEY", raising=False)
        with pytest.raises(errors.EmberboxError, match="API key") as denied:
            Sandbox.list()
        assert denied.value.details["status_code"] == 401
        monkeypatch.setenv("EMBERBOX_API_KEY", "k1")
        assert Sandbox.list() == []
        with pytest.raises(errors.EmberboxError, match="API key"):
            Sandbox.list(api_key="wrong")
        monkeypatch.setenv("EMBERBOX_URL", "http://127.0.0.1:1")
        assert Sandbox.list(url=url) == []


def test_config_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without arguments or environment the SDK talks to 127.0.0.1:8080 without a key."""
    monkeypatch.delenv("EMBERBOX_URL", raising=False)
    monkeypatch.delenv("EMBERBOX_API_KEY", raising=False)
    config = _calls.ClientConfig.resolve()
    assert (config.url, config.api_key) == ("http://127.0.0.1:8080", None)
    assert "Authorization" not in config.client_options()["headers"]
    keyed = _calls.ClientConfig.resolve("http://h:1/", "k")
    assert keyed.url == "http://h:1"
    assert keyed.client_options()["headers"]["Authorization"] == "Bearer k"
    assert "k" not in repr(keyed)


# --- request building and response parsing -----------------------------------------------


def test_calls_are_sized_to_their_work() -> None:
    """Exec waits for its own timeout plus a margin; create waits for a slow boot."""
    create = _calls.create_call("img", None, 256, None, {"a": "b"}, None)
    assert create.json == {"image": "img", "memory_mib": 256, "metadata": {"a": "b"}}
    assert create.wait_s >= 120
    run = _calls.run_call("sb-1", "sleep 100", None, None, 100, None)
    assert run.json == {"cmd": "sleep 100", "timeout_s": 100}
    assert run.wait_s == 100 + _calls.EXEC_MARGIN_S
    assert _calls.run_call("sb-1", ["ls"], None, None, None, None).wait_s >= 3600
    listing = _calls.list_call("running", {"team": "a"})
    assert listing.params == [("state", "running"), ("metadata.team", "a")]
    with pytest.raises(errors.InvalidRequest):
        _calls.get_call("../healthz")


def test_snapshot_calls() -> None:
    """Snapshot, pause and resume wait for a memory dump; ids cannot change the path."""
    fork = _calls.create_call(None, None, None, None, None, None, "snap-1")
    assert fork.json == {"snapshot_id": "snap-1"}
    for call, method, path in [
        (_calls.snapshot_call("sb-1"), "POST", "/v1/sandboxes/sb-1/snapshots"),
        (_calls.pause_call("sb-1"), "POST", "/v1/sandboxes/sb-1/pause"),
        (_calls.resume_call("sb-1"), "POST", "/v1/sandboxes/sb-1/resume"),
    ]:
        assert (call.method, call.path, call.json) == (method, path, None)
        assert call.wait_s > 300
    assert _calls.list_snapshots_call(None).params == []
    assert _calls.list_snapshots_call("sb-1").params == [("sandbox_id", "sb-1")]
    assert _calls.get_snapshot_call("snap-1").path == "/v1/snapshots/snap-1"
    assert _calls.delete_snapshot_call("snap-1").method == "DELETE"
    with pytest.raises(errors.InvalidRequest, match="not a snapshot id"):
        _calls.delete_snapshot_call("../v1/sandboxes/sb-1")


def _response(status: int, body: object | None = None, text: str = "") -> httpx.Response:
    request = httpx.Request("GET", "http://e/v1/sandboxes")
    if body is None:
        return httpx.Response(status, text=text, request=request)
    return httpx.Response(status, json=body, request=request)


def test_error_mapping_of_unknown_and_malformed_bodies() -> None:
    """Unknown types give EmberboxError, ValidationError InvalidRequest, HTML a status line."""
    unknown = _calls.error_from_response(
        _response(418, {"error": {"type": "Teapot", "message": "m"}})
    )
    assert type(unknown) is errors.EmberboxError
    assert str(unknown) == "m"
    invalid = _calls.error_from_response(
        _response(422, {"error": {"type": "ValidationError", "message": "vcpus: bad"}})
    )
    assert type(invalid) is errors.InvalidRequest
    timeout = _calls.error_from_response(
        _response(504, {"error": {"type": "ExecTimeout", "message": "t"}})
    )
    assert isinstance(timeout, errors.ExecTimeout)
    assert timeout.result is None
    corrupt = _calls.error_from_response(
        _response(502, {"error": {"type": "SnapshotCorrupt", "message": "m", "console_tail": "t"}})
    )
    assert isinstance(corrupt, errors.VMMError)
    assert (type(corrupt), corrupt.console_tail) == (errors.SnapshotCorrupt, "t")
    html = _calls.error_from_response(_response(502, text="<html>Bad Gateway</html>"))
    assert type(html) is errors.EmberboxError
    assert "HTTP 502" in str(html)
    assert "Bad Gateway" in str(html)


def test_every_error_class_survives_the_round_trip() -> None:
    """Each class of the tree, sent by name, comes back as exactly that class."""
    classes = errors.all_error_classes()
    assert classes["SnapshotMismatch"] is errors.SnapshotMismatch
    assert classes["SnapshotCorrupt"] is errors.SnapshotCorrupt
    for name, cls in classes.items():
        body = {"error": {"type": name, "message": "boom"}}
        exc = _calls.error_from_response(_response(cls.status_code, body))
        assert type(exc) is cls
        assert exc.message == "boom"


# --- the async client and parity ---------------------------------------------------------


@pytest.mark.anyio
async def test_async_lifecycle(url: str, manager: FakeManager) -> None:
    """The async client does what the sync one does."""
    async with await AsyncSandbox.create(metadata={"team": "z"}) as sb:
        assert (await sb.info()).state == "running"
        result = await sb.commands.run("echo hi")
        assert result.stdout == f"ran echo hi in {sb.id}\n"
        assert (await sb.set_timeout(60)).timeout_s == 60
        assert [s.id for s in await AsyncSandbox.list(metadata={"team": "z"})] == [sb.id]
        other = await AsyncSandbox.connect(sb.id)
        assert (await other.get_info()).id == sb.id
        await other.close()
    assert manager.records[sb.id].state.value == "stopped"
    with pytest.raises(errors.NotFound):
        await AsyncSandbox.connect("sb-nope")
    with pytest.raises(errors.ImageNotFound):
        await AsyncSandbox.create("ruby")


@pytest.mark.anyio
async def test_async_snapshots_pause_and_resume(url: str, manager: FakeManager) -> None:
    """The async client's snapshot calls do what the sync ones do."""
    async with await AsyncSandbox.create(memory_mib=256) as sb:
        snap = await sb.snapshot()
        assert (snap.sandbox_id, snap.memory_mib) == (sb.id, 256)
        async with await AsyncSandbox.create(snapshot_id=snap.id) as fork:
            assert (await fork.info()).snapshot_id == snap.id
            with pytest.raises(errors.SnapshotMismatch):
                await AsyncSandbox.create(snapshot_id=snap.id, memory_mib=512)
            with pytest.raises(errors.Conflict):
                await AsyncSnapshots.delete(snap.id)
        assert [s.id for s in await AsyncSnapshots.list(sb.id)] == [snap.id]
        assert await AsyncSnapshots.get(snap.id) == snap
        assert (await sb.pause()).state == "paused"
        assert (await sb.resume()).state == "running"
        await AsyncSnapshots.delete(snap.id)
    assert await AsyncSnapshots.list() == []
    with pytest.raises(errors.NotFound):
        await AsyncSnapshots.get(snap.id)


@pytest.mark.anyio
async def test_async_unreachable_server_is_a_host_error() -> None:
    """Connection refused raises HostError in the async client too."""
    with pytest.raises(errors.HostError, match="cannot reach emberbox"):
        await AsyncSandbox.create(url=f"http://127.0.0.1:{_closed_port()}")


def _public_methods(cls: type) -> dict[str, list[tuple[object, ...]]]:
    """Each public method's parameters as (name, kind, default, annotation without Async)."""
    return {
        name: [
            (p.name, p.kind, p.default, str(p.annotation).replace("Async", ""))
            for p in inspect.signature(member).parameters.values()
        ]
        for name, member in inspect.getmembers(cls)
        if callable(member) and (not name.startswith("_") or name == "__init__")
    }


@pytest.mark.parametrize(
    ("sync_cls", "async_cls"),
    [
        (Sandbox, AsyncSandbox),
        (sdk.Commands, sdk.AsyncCommands),
        (Snapshots, AsyncSnapshots),
        (sdk.CommandHandle, sdk.AsyncCommandHandle),
        (sdk.Files, sdk.AsyncFiles),
        (sdk.Pty, sdk.AsyncPty),
        (sdk.PtySession, sdk.AsyncPtySession),
    ],
)
def test_sync_and_async_have_the_same_calls(sync_cls: type, async_cls: type) -> None:
    """Same public names and parameters (names, kinds, defaults) in both clients."""
    sync_methods, async_methods = _public_methods(sync_cls), _public_methods(async_cls)
    assert set(sync_methods) == set(async_methods)
    for name, signature in sync_methods.items():
        assert signature == async_methods[name], name
        if name != "__init__":
            assert inspect.iscoroutinefunction(getattr(async_cls, name)), name
    assert set(_public_methods(Sandbox)) >= {
        "create",
        "connect",
        "list",
        "info",
        "get_info",
        "kill",
        "set_timeout",
        "pause",
        "resume",
        "snapshot",
    }


def test_exported_members() -> None:
    """The SDK's public surface is its flat __all__, error classes included."""
    assert set(sdk.__all__) == {name for name in dir(sdk) if not name.startswith("_")} - {
        "annotations"
    }
    for name in (
        "Sandbox",
        "AsyncSandbox",
        "CommandResult",
        "SandboxInfo",
        "NotFound",
        "HostError",
        "Snapshots",
        "AsyncSnapshots",
        "SnapshotInfo",
        "SnapshotMismatch",
        "SnapshotCorrupt",
        "CommandHandle",
        "AsyncCommandHandle",
        "Files",
        "AsyncFiles",
        "PtySession",
        "AsyncPtySession",
        "FileInfo",
        "ProcessInfo",
        "ProcessStatus",
    ):
        assert name in sdk.__all__
    assert sdk.NotFound is errors.NotFound


SERVER_MODULES = (
    *("emberbox.service", "emberbox.api", "emberbox.agent_client", "emberbox.images"),
    *("emberbox.store", "emberbox.vmm", "emberbox.net", "emberbox.config", "emberbox.guest"),
    *("fastapi", "starlette", "uvicorn", "pydantic_settings", "lz4"),
)


def test_the_sdk_loads_no_server_code() -> None:
    """`import emberbox.sdk` (wire models included) loads no server module or dependency."""
    code = (
        "import json, sys, emberbox, emberbox.sdk, emberbox.models.oneshot; "
        "emberbox.run_code; print(json.dumps(sorted(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(done.stdout)
    assert "emberbox.models.sandboxes" in loaded
    assert [name for name in loaded if name.startswith(SERVER_MODULES)] == []
