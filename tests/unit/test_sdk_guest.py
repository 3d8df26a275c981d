"""The SDK's background commands, files and terminals against the real app (fake guest)
served by uvicorn on a free port."""

from __future__ import annotations

import io
import tarfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from emberbox import errors
from emberbox.config import Settings
from emberbox.sdk import AsyncSandbox, CommandHandle, FileInfo, ProcessInfo, Sandbox, _guest
from tests.support.fakes_manager import FakeManager, fake_app
from tests.support.servers import serving

LIMIT = 1 << 20


@pytest.fixture
def anyio_backend() -> str:
    """Run async tests on asyncio only."""
    return "asyncio"


@pytest.fixture
def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeManager]:
    """A live server (upload limit 1 MiB) whose URL is EMBERBOX_URL; yields its manager."""
    settings = Settings(data_dir=tmp_path / "d", cache_dir=tmp_path / "c", max_upload_bytes=LIMIT)
    app, manager = fake_app(tmp_path, settings)
    with serving(app) as url:
        monkeypatch.setenv("EMBERBOX_URL", url)
        monkeypatch.delenv("EMBERBOX_API_KEY", raising=False)
        yield manager


def _wait_until(predicate: object, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# --- commands ----------------------------------------------------------------------------


def test_run_streams_output_to_handlers(manager: FakeManager) -> None:
    """on_stdout/on_stderr get text as it comes; the result is the same as without them."""
    out: list[str] = []
    err: list[str] = []
    with Sandbox.create() as sb:
        result = sb.commands.run("echo hi", on_stdout=out.append, on_stderr=err.append)
        assert out == [f"ran echo hi in {sb.id}\n"]
        assert err == ["err\ufffd\n"]
        assert result == sb.commands.run("echo hi")


def test_background_command_handle(manager: FakeManager) -> None:
    """background=True: a handle to feed, wait for, kill, list and reconnect to."""
    seen: list[str] = []
    with Sandbox.create() as sb:
        cat = sb.commands.run("cat", background=True, on_stdout=seen.append)
        assert isinstance(cat, CommandHandle)
        assert cat.status().running
        assert cat.send_stdin("hello ") == 6
        cat.send_stdin(b"world", close=True)
        result = cat.wait()
        assert (result.stdout, result.exit_code) == ("hello world", 0)
        assert "".join(seen) == "hello world"
        sleeper = sb.commands.run(["sleep", "100"], background=True)
        listed = sb.commands.list()
        assert all(isinstance(p, ProcessInfo) for p in listed)
        assert {(p.pid, p.running) for p in listed} == {(cat.pid, False), (sleeper.pid, True)}
        again = sb.commands.connect(sleeper.pid)
        again.kill()
        killed = sleeper.wait()
        assert (killed.signal, killed.exit_code) == (9, 137)
        with pytest.raises(errors.Conflict):
            sleeper.send_stdin("late")
        with pytest.raises(errors.NotFound):
            sb.commands.connect(4242)
        with pytest.raises(errors.InvalidRequest):
            sb.commands.connect(0)


# --- files -------------------------------------------------------------------------------


def test_files_round_trip(manager: FakeManager, tmp_path: Path) -> None:
    """write/read/list/stat/exists/make_dir/remove, and streamed upload and download."""
    with Sandbox.create() as sb:
        assert sb.files.write("/tmp/a.txt", "héllo") == 6
        assert sb.files.read("/tmp/a.txt") == "héllo".encode()
        assert sb.files.read_text("/tmp/a.txt") == "héllo"
        sb.files.write("/tmp/b.bin", iter([b"x" * 10, b"y" * 5]), mode=0o600)
        entries = sb.files.list("/tmp")
        assert all(isinstance(e, FileInfo) for e in entries)
        assert [(e.name, e.size, e.mode) for e in entries] == [
            ("a.txt", 6, 0o644),
            ("b.bin", 15, 0o600),
        ]
        assert sb.files.stat("/tmp").type == "dir"
        assert sb.files.exists("/tmp/a.txt")
        assert not sb.files.exists("/tmp/none")
        sb.files.make_dir("/srv/x/y")
        assert sb.files.stat("/srv/x/y").type == "dir"
        sb.files.remove("/srv", recursive=True)
        assert not sb.files.exists("/srv")
        local = tmp_path / "big.bin"
        local.write_bytes(bytes(range(256)) * 1000)
        assert sb.files.upload(local, "/tmp/big.bin") == 256_000
        assert manager.guests[sb.id].files["/tmp/big.bin"] == local.read_bytes()
        assert sb.files.download("/tmp/big.bin", tmp_path / "back.bin") == 256_000
        assert (tmp_path / "back.bin").read_bytes() == local.read_bytes()
        with pytest.raises(errors.InvalidRequest, match="directory"):
            sb.files.read("/tmp")
        with pytest.raises(errors.InvalidRequest, match="not a directory"):
            sb.files.list("/tmp/a.txt")
        with pytest.raises(errors.NotFound):
            sb.files.read("/nope")


def test_upload_past_the_limit_is_quota_exceeded(manager: FakeManager, tmp_path: Path) -> None:
    """An upload over max_upload_bytes raises QuotaExceeded (HTTP 413), from a file (a
    Content-Length, refused up front) or from an iterator (counted)."""
    local = tmp_path / "too-big"
    local.write_bytes(b"z" * (LIMIT + 1))
    with Sandbox.create() as sb:
        with pytest.raises(errors.QuotaExceeded) as refused:
            sb.files.upload(local, "/tmp/too-big")
        assert refused.value.details["status_code"] == 413
        with pytest.raises(errors.QuotaExceeded):
            sb.files.write("/tmp/too-big", iter([b"z" * 65536] * 17))
        assert not sb.files.exists("/tmp/too-big")


def test_directories_round_trip(manager: FakeManager, tmp_path: Path) -> None:
    """upload_dir sends a tree as one tar; download_dir brings it back."""
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_text("A")
    (tree / "sub" / "b.txt").write_text("B")
    with Sandbox.create() as sb:
        assert sb.files.upload_dir(tree, "/srv/app") == 3
        assert manager.guests[sb.id].files["/srv/app/sub/b.txt"] == b"B"
        back = tmp_path / "back"
        assert sb.files.download_dir("/srv/app", back) == 3
        assert (back / "a.txt").read_text() == "A"
        assert (back / "sub" / "b.txt").read_text() == "B"


def _archive(*members: tarfile.TarInfo) -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for member in members:
            tar.addfile(member, io.BytesIO(b"x" * member.size))
    return buffer


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, 1 if kind == tarfile.REGTYPE else 0
    return info


def test_download_dir_never_writes_outside_its_directory(tmp_path: Path) -> None:
    """A hostile guest's tar: .. and links out are refused; absolute names land inside."""
    hostile = [
        [_member("../escaped")],
        [_member("sub/../../escaped")],
        [_member("link", tarfile.SYMTYPE, str(tmp_path)), _member("link/escaped")],
        [_member("hard", tarfile.LNKTYPE, "../../escaped")],
        [_member("dev", tarfile.CHRTYPE)],
    ]
    for members in hostile:
        with pytest.raises(errors.InvalidRequest, match="refused"):
            _guest.unpack_into(_archive(*members), tmp_path / "dest")
        assert not (tmp_path / "escaped").exists()
    assert _guest.unpack_into(_archive(_member("/abs/name")), tmp_path / "dest") == 1
    assert (tmp_path / "dest" / "abs" / "name").read_bytes() == b"x"


# --- terminals ---------------------------------------------------------------------------


def test_pty_session(manager: FakeManager) -> None:
    """create opens a terminal of the asked size; send/recv, resize; close ends it."""
    with Sandbox.create() as sb:
        guest = manager.guests[sb.id]
        with sb.pty.create(100, 30) as term:
            assert guest.processes[term.pid].pty == (100, 30)
            term.send("echo hi\r")
            assert term.recv(timeout_s=5) == b"echo hi\r"
            term.resize(120, 40)
            _wait_until(lambda: guest.resizes == [(term.pid, 120, 40)])
            with pytest.raises(TimeoutError):
                term.recv(timeout_s=0.1)
        _wait_until(lambda: term.pid not in guest.processes)
        with sb.pty.create() as ended:
            ended.send(b"exit 3")
            assert b"".join(ended) == b"exit 3"
            assert ended.exit_code == 3
            assert ended.recv() == b""
        with pytest.raises(errors.EmberboxError) as missing:
            Sandbox("sb-nope").pty.create()
        assert missing.value.details["status_code"] == 404


# --- the async client --------------------------------------------------------------------


@pytest.mark.anyio
async def test_async_commands_files_and_pty(manager: FakeManager, tmp_path: Path) -> None:
    """The async client does what the sync one does (async handlers are awaited)."""
    seen: list[str] = []

    async def on_stdout(text: str) -> None:
        seen.append(text)

    async with await AsyncSandbox.create() as sb:
        result = await sb.commands.run("echo hi", on_stdout=on_stdout)
        assert seen == [result.stdout]
        cat = await sb.commands.run("cat", background=True)
        await cat.send_stdin("abc", close=True)
        assert (await cat.wait()).stdout == "abc"
        assert [p.pid for p in await sb.commands.list()] == [cat.pid]

        async def chunks() -> AsyncIterator[bytes]:
            yield b"12"
            yield b"34"

        assert await sb.files.write("/tmp/n", chunks()) == 4
        assert await sb.files.read("/tmp/n") == b"1234"
        local = tmp_path / "f"
        local.write_bytes(b"q" * 300_000)
        assert await sb.files.upload(local, "/tmp/f") == 300_000
        assert await sb.files.download("/tmp/f", tmp_path / "g") == 300_000
        assert [e.name for e in await sb.files.list("/tmp")] == ["f", "n"]
        (tmp_path / "tree").mkdir()
        (tmp_path / "tree" / "x").write_text("X")
        assert await sb.files.upload_dir(tmp_path / "tree", "/srv") == 1
        assert await sb.files.download_dir("/srv", tmp_path / "out") == 1
        assert (tmp_path / "out" / "x").read_text() == "X"
        async with await sb.pty.create(90, 20) as term:
            assert manager.guests[sb.id].processes[term.pid].pty == (90, 20)
            await term.send("exit 0")
            assert b"".join([chunk async for chunk in term]) == b"exit 0"
            assert term.exit_code == 0
