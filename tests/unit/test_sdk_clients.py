"""The SDK's sync and async clients against the real app (fake manager) served by
uvicorn on a free port."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

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
