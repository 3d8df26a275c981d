"""Files through a real ``emberbox serve`` over real VMs: a 512 MiB round trip in flat
server memory, guest-side paths, directories, archives, ``emberbox cp``, the upload
limit, and the async client."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from emberbox.images.registry import ImageInfo
from emberbox.sdk import AsyncSandbox, Sandbox
from tests.support.archives import tar_of
from tests.support.paths import REPO
from tests.support.server_calls import cli_argv, new_sandbox, run_command
from tests.support.servers import Server, serve_emberbox

pytestmark = [pytest.mark.vm]

MIB = 1 << 20
BIG_FILE_MIB = 512
RSS_BUDGET_MIB = 64


def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def _make_big_file(path: Path, mib: int) -> str:
    digest = hashlib.sha256()
    with path.open("wb") as f:
        for _ in range(mib):
            block = os.urandom(MIB)
            digest.update(block)
            f.write(block)
    return digest.hexdigest()


@pytest.mark.timeout(1200)
def test_512_mib_file_in_and_out_with_flat_server_memory(server: Server, tmp_path: Path) -> None:
    """A 512 MiB file goes in and comes back byte-identical (sha256) while the server's
    peak RSS grows by less than 64 MiB."""
    local = tmp_path / "big.bin"
    expected = _make_big_file(local, BIG_FILE_MIB)
    pid = server.process.pid
    with Sandbox.create() as sb:
        baseline = _rss_kib(pid, "VmRSS")
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS from here on
        started = time.monotonic()
        assert sb.files.upload(local, "/root/big.bin") == BIG_FILE_MIB * MIB
        upload_s = time.monotonic() - started
        guest_sum = sb.commands.run("sha256sum /root/big.bin", timeout_s=300).stdout
        assert guest_sum.split()[0] == expected
        digest, size = hashlib.sha256(), 0
        started = time.monotonic()
        with httpx.stream(
            "GET",
            f"{server.url}/v1/sandboxes/{sb.id}/files",
            params={"path": "/root/big.bin"},
            timeout=300,
        ) as response:
            assert response.status_code == 200
            for chunk in response.iter_bytes():
                digest.update(chunk)
                size += len(chunk)
        download_s = time.monotonic() - started
        peak = _rss_kib(pid, "VmHWM")
    growth_mib = (peak - baseline) / 1024
    print(
        f"\n512 MiB: upload {upload_s:.1f} s ({BIG_FILE_MIB / upload_s:.0f} MiB/s), "
        f"download {download_s:.1f} s ({BIG_FILE_MIB / download_s:.0f} MiB/s); server RSS "
        f"{baseline / 1024:.0f} MiB before, peak {peak / 1024:.0f} MiB (+{growth_mib:.1f} MiB)"
    )
    assert (size, digest.hexdigest()) == (BIG_FILE_MIB * MIB, expected)
    assert growth_mib < RSS_BUDGET_MIB


def test_paths_are_resolved_by_the_guest(server: Server, tmp_path: Path) -> None:
    """`..`, absolute and relative paths and symlinks mean what they mean in the guest;
    no path reaches the host's files."""
    marker = server.settings.data_dir / "host-only-marker"
    marker.write_text("host secret")
    with server.client() as client:
        sandbox_id = new_sandbox(client)
        files = f"/v1/sandboxes/{sandbox_id}/files"

        def read(path: str) -> httpx.Response:
            return client.get(files, params={"path": path})

        guest_only = "/etc/emberbox-guest-marker"
        run_command(client, sandbox_id, f"echo guest-$(hostname) > {guest_only}")
        assert not Path(guest_only).exists()  # (not on the host)
        guest_name = read(guest_only).text
        assert guest_name.startswith("guest-emberbox-"), guest_name
        for same in (guest_only[1:], f"/tmp/..{guest_only}", f"../../../..{guest_only}"):
            assert read(same).text == guest_name, same
        put = client.put(files, params={"path": "/tmp/../root/dotdot.txt"}, content=b"in root")
        assert put.status_code == 200, put.text
        assert run_command(client, sandbox_id, "cat /root/dotdot.txt")["stdout"] == "in root"
        run_command(client, sandbox_id, f"ln -s /etc /tmp/etc-link; ln -s {marker} /tmp/host-link")
        assert read("/tmp/etc-link/emberbox-guest-marker").text == guest_name
        listing = read("/tmp/etc-link").json()
        assert "emberbox-guest-marker" in [e["name"] for e in listing["entries"]]
        assert client.get(f"{files}/stat", params={"path": "/tmp/etc-link"}).json()["type"] == (
            "symlink"
        )
        for host_path in (str(marker), "/tmp/host-link", f"/proc/1/root{marker}"):
            response = read(host_path)
            assert response.status_code == 404, (host_path, response.text)
            assert "host secret" not in response.text
        written = client.put(files, params={"path": str(marker)}, content=b"overwritten?")
        assert written.status_code == 404, written.text
    assert marker.read_text() == "host secret"


def test_directories_archives_and_cp(server: Server, tmp_path: Path) -> None:
    """upload_dir/download_dir and `emberbox cp` round trips; a tar member with `..`
    is refused by the guest."""
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_text("A")
    (tree / "sub" / "b.bin").write_bytes(bytes(range(256)))
    with Sandbox.create() as sb:
        assert sb.files.upload_dir(tree, "/srv/app") == 3
        assert sb.commands.run("cat /srv/app/a.txt").stdout == "A"
        assert sb.files.download_dir("/srv/app", tmp_path / "back") == 3
        assert (tmp_path / "back" / "sub" / "b.bin").read_bytes() == bytes(range(256))
        assert [e.name for e in sb.files.list("/srv/app")] == ["a.txt", "sub"]
        sb.files.remove("/srv/app", recursive=True)
        assert not sb.files.exists("/srv/app")
        refused = _put_archive(sb.id, {"../../etc/evil": b"x"})
        assert (refused.status_code, refused.json()["error"]["type"]) == (400, "InvalidRequest")
        assert not sb.files.exists("/etc/evil")
        copied = subprocess.run(
            [*cli_argv(), "cp", str(tree), f"{sb.id}:/opt/tree"], capture_output=True, cwd=REPO
        )
        assert copied.returncode == 0, copied.stderr
        assert sb.files.read("/opt/tree/sub/b.bin") == bytes(range(256))
        fetched = subprocess.run(
            [*cli_argv(), "cp", f"{sb.id}:/opt/tree/a.txt", "-"], capture_output=True, cwd=REPO
        )
        assert (fetched.returncode, fetched.stdout) == (0, b"A")


def _put_archive(sandbox_id: str, members: dict[str, bytes]) -> httpx.Response:
    url = os.environ["EMBERBOX_URL"]
    return httpx.put(
        f"{url}/v1/sandboxes/{sandbox_id}/archive",
        params={"path": "/tmp/x"},
        content=tar_of(members),
        timeout=60,
    )


def test_upload_limit_is_413(data_dir: Path, default_image: ImageInfo) -> None:
    """Past EMBERBOX_MAX_UPLOAD_BYTES: 413 up front with a Content-Length, 413 once
    counted for a chunked body; the old file is untouched."""
    limited_server = serve_emberbox(data_dir, EMBERBOX_MAX_UPLOAD_BYTES=str(MIB))
    with limited_server as limited, limited.client() as client:
        sandbox_id = new_sandbox(client)
        files = f"/v1/sandboxes/{sandbox_id}/files"
        assert client.put(files, params={"path": "/root/f"}, content=b"old").status_code == 200
        response = client.put(files, params={"path": "/root/f"}, content=b"x" * (2 * MIB))
        assert (response.status_code, response.json()["error"]["type"]) == (
            413,
            "PayloadTooLarge",
        )

        def chunked() -> Iterator[bytes]:
            for _ in range(32):
                yield b"y" * 65536

        response = client.put(files, params={"path": "/root/f"}, content=chunked())
        assert response.status_code == 413, response.text
        assert client.get(files, params={"path": "/root/f"}).content == b"old"
        leftovers = run_command(client, sandbox_id, "ls -A /root")["stdout"].split()
        assert [name for name in leftovers if name.startswith(".f.")] == []


@pytest.mark.anyio
async def test_async_sdk_files_and_background(server: Server) -> None:
    """The async client: files, a background command and a terminal."""
    async with await AsyncSandbox.create() as sb:
        await sb.files.write("/tmp/x.txt", "héllo")
        assert await sb.files.read_text("/tmp/x.txt") == "héllo"
        handle = await sb.commands.run("sleep 0.5; cat /tmp/x.txt", background=True)
        assert (await handle.wait()).stdout == "héllo"
        async with await sb.pty.create(70, 10) as term:
            await term.send("stty size; exit\n")
            output = b"".join([chunk async for chunk in term]).decode(errors="replace")
        assert "10 70" in output
