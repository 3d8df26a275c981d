"""File ops and tar streams on the real agent, run on the host over its unix socket."""

from __future__ import annotations

import asyncio
import io
import os
import stat
import tarfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from emberbox import errors
from emberbox.agent_client.client import AgentClient
from emberbox.guest import protocol
from tests.support.agent import (
    RunningAgent,
    chunked,
    collect,
    eventually,
    sha256,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def work(agent: RunningAgent) -> Path:
    path = Path(agent.workdir, "files")
    path.mkdir()
    return path


async def test_multi_mib_file_round_trip(client: AgentClient, work: Path) -> None:
    """A file larger than the window goes up and comes back chunked, byte for byte."""
    data = os.urandom(3 * protocol.WINDOW + 777)
    target = str(work / "big.bin")
    assert await client.write_file(target, chunked(data, 100_001)) == len(data)
    assert sha256(await content(target)) == sha256(data)
    sizes: list[int] = []
    assert sha256(await collect(client.read_file(target), sizes)) == sha256(data)
    assert max(sizes) <= protocol.DATA_CHUNK and len(sizes) > len(data) // protocol.DATA_CHUNK
    middle = await collect(client.read_file(target, offset=1000, length=200_000))
    assert middle == data[1000:201_000]
    assert await collect(client.read_file(target, offset=len(data) + 5)) == b""


async def test_write_modes_offsets_and_truncation(client: AgentClient, work: Path) -> None:
    """mode applies to new files; offset writes in place; truncate ends the file there."""
    target = str(work / "f.txt")
    await client.write_file(target, b"hello world", mode=0o600)
    assert (await client.stat(target)).mode == 0o600
    await client.write_file(target, b"WORLD", offset=6, truncate=False)
    assert await content(target) == b"hello WORLD"
    await client.write_file(target, b"HE", offset=0, truncate=False)
    assert await content(target) == b"HEllo WORLD"
    await client.write_file(target, b"!", offset=5, mode=0o755)
    assert await content(target) == b"HEllo!"
    assert (await client.stat(target)).mode == 0o600  # mode is for new files only
    await client.write_file(target, b"")
    assert await content(target) == b""


async def test_stat_list_mkdir_rename_remove(client: AgentClient, work: Path) -> None:
    """The directory ops do what their names say, and stat does not follow symlinks."""
    await client.make_dir(str(work / "a/b/c"), mode=0o700)
    assert stat.S_IMODE(os.stat(work / "a/b/c").st_mode) == 0o700
    await client.write_file(str(work / "a/file"), b"12345")
    os.symlink("file", work / "a/link")
    entries = await client.list_dir(str(work / "a"))
    assert [(e.name, e.type) for e in entries] == [
        ("b", "dir"),
        ("file", "file"),
        ("link", "symlink"),
    ]
    assert entries[1].path == str(work / "a/file") and entries[1].size == 5
    info = await client.stat(str(work / "a/link"))
    assert (info.name, info.type) == ("link", "symlink")
    await client.rename(str(work / "a/file"), str(work / "a/b/moved"))
    assert (work / "a/b/moved").read_bytes() == b"12345"
    with pytest.raises(errors.Conflict, match="not empty"):
        await client.remove(str(work / "a"))
    await client.remove(str(work / "a/link"))
    await client.remove(str(work / "a"), recursive=True)
    assert not (work / "a").exists()
    with pytest.raises(errors.Conflict):
        await client.make_dir(str(work), parents=False)
    await client.make_dir(str(work))  # parents=True: an existing directory is fine


async def test_file_errors(client: AgentClient, work: Path) -> None:
    """Missing paths are NotFound naming the path; wrong kinds of file are InvalidRequest."""
    missing = str(work / "nope")
    with pytest.raises(errors.NotFound, match=f"No such file or directory: {missing}"):
        await client.stat(missing)
    with pytest.raises(errors.NotFound, match="nope"):
        await collect(client.read_file(missing))
    with pytest.raises(errors.NotFound):
        await client.write_file(str(work / "nope/x"), b"data")
    with pytest.raises(errors.NotFound):
        await client.remove(missing)
    (work / "f").write_bytes(b"x")
    with pytest.raises(errors.InvalidRequest, match="Not a directory"):
        await client.list_dir(str(work / "f"))
    with pytest.raises(errors.InvalidRequest, match="not a regular file"):
        await collect(client.read_file(str(work)))
    with pytest.raises(errors.InvalidRequest, match="refusing"):
        await client.remove("/", recursive=True)
    relative = str(work / "f").lstrip("/")  # relative paths start at /
    assert (await client.stat(relative)).size == 1


async def test_abandoned_read_is_cancelled(
    client: AgentClient, agent: RunningAgent, work: Path
) -> None:
    """A reader that stops early makes the agent stop too: its file is closed."""
    target = work / "big.bin"
    target.write_bytes(os.urandom(2 * protocol.WINDOW))
    reader = client.read_file(str(target))
    assert len(await anext(reader)) == protocol.DATA_CHUNK
    assert str(target) in agent.open_fds()
    await reader.aclose()  # type: ignore[attr-defined]
    await eventually(lambda: str(target) not in agent.open_fds(), "the agent closed the file")
    await client.ping()


async def content(path: str) -> bytes:
    return await asyncio.to_thread(Path(path).read_bytes)


def make_tree(root: Path) -> None:
    (root / "sub/deeper").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "top.txt").write_text("top")
    (root / "sub/run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "sub/run.sh").chmod(0o755)
    (root / "sub/deeper/blob").write_bytes(os.urandom(300_000))
    os.link(root / "top.txt", root / "sub/hard.txt")
    os.symlink("../top.txt", root / "sub/link")


def snapshot(root: Path) -> dict[str, tuple[str, int, bytes]]:
    """Each path below root: kind, permission bits and content (or symlink target)."""
    found = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        if path.is_symlink():
            found[str(path.relative_to(root))] = ("link", 0, os.readlink(path).encode())
        elif path.is_dir():
            found[str(path.relative_to(root))] = ("dir", stat.S_IMODE(info.st_mode), b"")
        else:
            content = path.read_bytes()
            found[str(path.relative_to(root))] = ("file", stat.S_IMODE(info.st_mode), content)
    return found


async def test_tar_round_trip(client: AgentClient, work: Path) -> None:
    """tar_out then tar_in reproduces a tree: contents, modes, symlinks and hard links."""
    make_tree(work / "src")
    archive = await collect(client.tar_out(str(work / "src")))
    assert len(archive) % tarfile.RECORDSIZE == 0
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        names = {m.name: m for m in tar.getmembers()}
    assert names["sub/link"].issym() and names["sub/link"].linkname == "../top.txt"
    assert names["sub/hard.txt"].isreg() and names["top.txt"].islnk()  # the first one is whole
    entries = await client.tar_in(str(work / "dst/new"), chunked(archive, 7000))
    assert entries == len(names)
    assert snapshot(work / "dst/new") == snapshot(work / "src")
    assert os.stat(work / "dst/new/top.txt").st_ino == os.stat(work / "dst/new/sub/hard.txt").st_ino
    single = await collect(client.tar_out(str(work / "src/top.txt")))
    with tarfile.open(fileobj=io.BytesIO(single)) as tar:
        assert [(m.name, tar.extractfile(m).read()) for m in tar] == [("top.txt", b"top")]  # type: ignore[union-attr]


def tar_of(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, 0o644
    return info


def evil(outside: Path) -> dict[str, Callable[[], bytes]]:
    return {
        "dotdot": lambda: tar_of((member("ok.txt"), b"ok"), (member("../x"), b"evil")),
        "absolute": lambda: tar_of((member(str(outside / "abs")), b"evil")),
        "symlink then file": lambda: tar_of(
            (member("link", tarfile.SYMTYPE, str(outside)), b""), (member("link/x"), b"evil")
        ),
        "char device": lambda: tar_of((member("null", tarfile.CHRTYPE), b"")),
        "block device": lambda: tar_of((member("sda", tarfile.BLKTYPE), b"")),
        "fifo": lambda: tar_of((member("pipe", tarfile.FIFOTYPE), b"")),
        "hard link outside": lambda: tar_of(
            (member("h", tarfile.LNKTYPE, f"../{outside.name}/secret"), b"")
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "dotdot",
        "absolute",
        "symlink then file",
        "char device",
        "block device",
        "fifo",
        "hard link outside",
    ],
)
async def test_tar_in_refuses_unsafe_members(client: AgentClient, work: Path, case: str) -> None:
    """Escaping names, paths through symlinks, devices, FIFOs and outer hard links are refused."""
    outside = work / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    archive = evil(outside)[case]()
    with pytest.raises(errors.InvalidRequest, match=r"refused|symlink"):
        await client.tar_in(str(work / "dest"), chunked(archive, 4096))
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert not (work / "x").exists()
    await client.ping()


async def test_tar_in_replaces_a_symlink_instead_of_following_it(
    client: AgentClient, work: Path
) -> None:
    """A file member named like an existing symlink replaces the link, not its target."""
    (work / "outside").mkdir()
    dest = work / "dest"
    dest.mkdir()
    os.symlink(work / "outside/target", dest / "name")
    await client.tar_in(str(dest), chunked(tar_of((member("name"), b"data")), 512))
    assert not (work / "outside/target").exists()
    assert not (dest / "name").is_symlink() and (dest / "name").read_bytes() == b"data"


async def test_tar_in_rejects_garbage(client: AgentClient, work: Path) -> None:
    """Bytes that are not a tar stream are InvalidRequest."""
    with pytest.raises(errors.InvalidRequest, match="not a valid tar stream"):
        await client.tar_in(str(work / "dest"), chunked(os.urandom(5000), 1000))


async def test_failing_upload_is_cancelled(
    client: AgentClient, agent: RunningAgent, work: Path
) -> None:
    """When the caller's data fails mid-upload, the error surfaces and the agent lets go."""
    target = str(work / "partial.bin")

    async def broken() -> AsyncIterator[bytes]:
        yield b"x" * 100_000
        raise RuntimeError("source failed")

    with pytest.raises(RuntimeError, match="source failed"):
        await client.write_file(target, broken())
    await eventually(lambda: target not in agent.open_fds(), "the agent closed the file")
    await client.ping()
