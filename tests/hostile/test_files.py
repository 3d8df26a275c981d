"""Hostile callers of the files API: traversal, symlinks, tar tricks, oversized uploads.

The guest is root in its own VM, so it may read its own /etc; the point is that the HOST
is never touched: a canary directory on the host, watched with inotify, sees no access,
and nothing appears next to it. Every answer is a 4xx or a 2xx about the guest's files.
"""

from __future__ import annotations

import ctypes
import io
import os
import secrets
import struct
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.hostile import (
    ACK_PATH,
    Bystander,
    HostileCase,
    HostileServer,
    assert_cleaned_up,
    put_acknowledged,
)
from tests.support.paths import short_tmp_dir

pytestmark = [pytest.mark.vm]

MAX_UPLOAD = 1 << 20
SERVER_ENV = {"EMBERBOX_MAX_UPLOAD_BYTES": str(MAX_UPLOAD)}
IN_ALL = 0x00000FFF  # every inotify event on the watched directory and its entries


class HostCanary:
    """A host directory holding a secret file; inotify reports any access to either."""

    def __init__(self) -> None:
        self.dir = short_tmp_dir("eb-canary-")
        self.secret = secrets.token_hex(16)
        (self.dir / "secret.txt").write_text(self.secret)
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self._fd >= 0
        wd = self._libc.inotify_add_watch(self._fd, str(self.dir).encode(), IN_ALL)
        assert wd >= 0, os.strerror(ctypes.get_errno())

    @property
    def file(self) -> Path:
        return self.dir / "secret.txt"

    def events(self) -> list[int]:
        """The masks of the events since the last call."""
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return []
        masks, offset = [], 0
        while offset < len(data):
            _, mask, _, length = struct.unpack_from("iIII", data, offset)
            masks.append(mask)
            offset += 16 + length
        return masks

    def assert_untouched(self) -> None:
        assert self.events() == []
        assert sorted(p.name for p in self.dir.iterdir()) == ["secret.txt"]
        assert self.file.read_text() == self.secret

    def close(self) -> None:
        os.close(self._fd)
        for entry in self.dir.iterdir():
            entry.unlink()
        self.dir.rmdir()


@pytest.fixture
def canary() -> Iterator[HostCanary]:
    watched = HostCanary()
    yield watched
    watched.close()


@pytest.fixture
def guest(server: HostileServer, bystander: Bystander) -> Iterator[tuple[httpx.Client, str]]:
    with server.client() as client:
        sandbox_id = server.create(client, metadata={"role": "files"})
        put_acknowledged(client, sandbox_id, b"acknowledged\n")
        yield client, sandbox_id
        assert client.delete(f"/v1/sandboxes/{sandbox_id}").status_code == 204
        assert_cleaned_up(server, sandbox_id)


def test_traversal_and_symlinks_never_reach_the_host(
    guest: tuple[httpx.Client, str],
    canary: HostCanary,
    bystander: Bystander,
    server: HostileServer,
    hostile_case: HostileCase,
) -> None:
    """`..`, absolute host paths, /proc/1/root and guest symlinks to /etc, /proc/1 and
    the host canary's path: reads answer the guest's files or 404, writes land in the
    guest; the host canary sees no access at all."""
    client, sandbox_id = guest
    files = f"/v1/sandboxes/{sandbox_id}/files"
    host_dir = str(canary.dir)
    with hostile_case("traversal and symlinks on the files API", "guest resolves paths") as case:
        links = {"/root/l_etc": "/etc", "/root/l_proc1": "/proc/1", "/root/l_canary": host_dir}
        script = "; ".join(f"ln -s {target} {link}" for link, target in links.items())
        assert _exec(client, sandbox_id, script)["exit_code"] == 0
        reads = [
            f"../../../../../..{canary.file}",
            str(canary.file),
            f"/proc/1/root{canary.file}",
            f"/proc/self/root/{canary.file}",
            f"//..//..//{canary.file}",
            "/root/l_canary/secret.txt",
            "/root/l_proc1/root" + str(canary.file),
        ]
        for path in reads:
            response = client.get(files, params={"path": path})
            assert response.status_code == 404, (path, response.text)
            assert canary.secret not in response.text
        hostname = client.get(files, params={"path": "/root/l_etc/os-release"})
        assert hostname.status_code == 200  # the guest's own /etc, as its `cat` sees it
        assert hostname.text == _exec(client, sandbox_id, "cat /etc/os-release")["stdout"]
        environ = client.get(files, params={"path": "/root/l_proc1/environ"})
        assert environ.status_code == 200  # the guest agent's own environment
        writes = [f"../../../../..{host_dir}/pwned", f"{host_dir}/pwned", "/root/l_canary/pwned"]
        for path in writes:
            response = client.put(files, params={"path": path}, content=b"pwned")
            assert response.status_code in (200, 404), (path, response.text)
        response = client.delete(files, params={"path": str(canary.file)})
        assert response.status_code == 404, response.text
        mkdir = client.post(f"{files}/mkdir", json={"path": f"/../..{host_dir}/made"})
        assert mkdir.status_code == 204, mkdir.text  # in the guest: it has no such dir
        tar = client.get(f"/v1/sandboxes/{sandbox_id}/archive", params={"path": host_dir})
        assert tar.status_code == 200
        assert canary.secret.encode() not in tar.content
        canary.assert_untouched()
        bystander.check()
        case.outcome = f"{len(reads)} reads 404, {len(writes)} writes in guest; canary untouched"


def _tar(*members: tuple[str, str, bytes | str]) -> bytes:
    """A tar of (kind, name, data-or-link-target) members."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for kind, name, payload in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                assert isinstance(payload, bytes)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
                continue
            info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE}.get(
                kind, tarfile.CHRTYPE
            )
            info.linkname = str(payload)
            tar.addfile(info)
    return out.getvalue()


def test_tar_upload_tricks(
    guest: tuple[httpx.Client, str],
    canary: HostCanary,
    bystander: Bystander,
    hostile_case: HostileCase,
) -> None:
    """Tar members named `../x` or `/etc/x`, a symlink then a file through it, hard links
    out and device nodes: 400 each, and no member lands outside the destination."""
    client, sandbox_id = guest
    archive = f"/v1/sandboxes/{sandbox_id}/archive"
    evil = [
        _tar(("file", "ok.txt", b"ok"), ("file", "../../root/escaped.txt", b"x")),
        _tar(("file", "/etc/evil.txt", b"x")),
        _tar(("symlink", "link", "/etc"), ("file", "link/evil.txt", b"x")),
        _tar(("symlink", "up", "../../.."), ("file", "up/etc/evil.txt", b"x")),
        _tar(("symlink", "host", str(canary.dir)), ("file", "host/pwned", b"x")),
        _tar(("hardlink", "shadow", "/etc/shadow")),
        _tar(("char", "mem", "")),
    ]
    with hostile_case(
        "tar upload with ../, absolute, symlink-then-file", "guest tar checks"
    ) as case:
        for i, body in enumerate(evil):
            response = client.put(archive, params={"path": f"/root/t{i}"}, content=body)
            assert response.status_code == 400, (i, response.text)
        # Members before a refused one stay (a symlink may point anywhere in the guest);
        # nothing is ever written through one, nor outside the destination.
        escaped = f"/root/escaped.txt /etc/evil.txt {canary.dir}/pwned /root/t6/mem"
        check = f"ls -d {escaped} 2>/dev/null | wc -l; find /root/t* -type f"
        assert _exec(client, sandbox_id, check)["stdout"] == "0\n/root/t0/ok.txt\n"
        canary.assert_untouched()
        bystander.check()
        case.outcome = f"{len(evil)} archives refused (400); nothing outside the target"


def test_oversized_upload(
    guest: tuple[httpx.Client, str], bystander: Bystander, hostile_case: HostileCase
) -> None:
    """Uploads over max_upload_bytes: 413 with or without a Content-Length, nothing kept
    (no file, no temporary), and a file they would have replaced keeps its content."""
    client, sandbox_id = guest
    files = f"/v1/sandboxes/{sandbox_id}/files"
    big = b"z" * (MAX_UPLOAD + 4096)

    def chunked() -> Iterator[bytes]:
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    with hostile_case("oversized upload", "max_upload_bytes (413)") as case:
        for path in ("/root/big.bin", ACK_PATH):
            sized = client.put(files, params={"path": path}, content=big)
            assert sized.status_code == 413, sized.text
            streamed = client.put(files, params={"path": path}, content=chunked())
            assert streamed.status_code == 413, streamed.text
        tar = client.put(
            f"/v1/sandboxes/{sandbox_id}/archive",
            params={"path": "/root/big"},
            content=_tar(("file", "big.bin", big)),
        )
        assert tar.status_code == 413, tar.text
        assert client.get(files, params={"path": "/root/big.bin"}).status_code == 404
        assert client.get(files, params={"path": ACK_PATH}).content == b"acknowledged\n"
        listing = client.get(files, params={"path": "/root"}).json()["entries"]
        assert not [e["name"] for e in listing if e["name"].endswith(".upload")]
        assert client.get(files, params={"path": "/root/big"}).status_code == 404
        bystander.check()
        case.outcome = "413 sized and chunked; old file intact, no temporaries"


def _exec(client: httpx.Client, sandbox_id: str, cmd: str) -> dict[str, object]:
    response = client.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"cmd": cmd})
    assert response.status_code == 200, response.text
    result: dict[str, object] = response.json()
    return result
