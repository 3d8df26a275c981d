"""Streamed exec, background processes, terminals and files through a real
``emberbox serve`` over real VMs (HTTP, the SDK and the CLI)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect

from emberbox.images.registry import ImageInfo
from emberbox.sdk import AsyncSandbox, Sandbox
from tests.support.paths import REPO
from tests.support.servers import Server, serve_emberbox

pytestmark = [pytest.mark.vm]

MIB = 1 << 20
BIG_FILE_MIB = 512
RSS_BUDGET_MIB = 64


@pytest.fixture
def anyio_backend() -> str:
    """Run async tests on asyncio only."""
    return "asyncio"


@pytest.fixture
def server(
    data_dir: Path, default_image: ImageInfo, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Server]:
    """A real server; its URL is also EMBERBOX_URL for the SDK and the CLI."""
    with serve_emberbox(data_dir) as running:
        monkeypatch.setenv("EMBERBOX_URL", running.url)
        monkeypatch.delenv("EMBERBOX_API_KEY", raising=False)
        yield running


def _sandbox(client: httpx.Client, **body: Any) -> str:
    response = client.post("/v1/sandboxes", json=body)
    assert response.status_code == 201, response.text
    sandbox_id: str = response.json()["id"]
    return sandbox_id


def _exec(client: httpx.Client, sandbox_id: str, cmd: str | list[str]) -> dict[str, Any]:
    response = client.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"cmd": cmd, "timeout_s": 60})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def _until(what: str, check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


# --- streamed exec -----------------------------------------------------------------------


def test_exec_stream_delivers_output_as_it_is_produced(server: Server) -> None:
    """A line every 0.5 s for 3 s: the first NDJSON event arrives within 1 s, the lines
    arrive spread over the run, and the exit event ends the stream."""
    with server.client() as client:
        sandbox_id = _sandbox(client)
        cmd = "for i in 1 2 3 4 5 6; do echo line $i; sleep 0.5; done"
        arrivals: list[tuple[float, dict[str, Any]]] = []
        started = time.monotonic()
        body = {"cmd": cmd, "stream": True}
        with client.stream("POST", f"/v1/sandboxes/{sandbox_id}/exec", json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "application/x-ndjson"
            for line in response.iter_lines():
                arrivals.append((time.monotonic() - started, json.loads(line)))
    first_s = arrivals[0][0]
    print(f"\nNDJSON first event after {first_s * 1000:.0f} ms")
    assert first_s < 1.0
    lines = [(t, e) for t, e in arrivals if e["type"] == "stdout"]
    assert "".join(e["data"] for _, e in lines) == "".join(f"line {i}\n" for i in range(1, 7))
    assert lines[-1][0] - lines[0][0] >= 2.0  # streamed, not delivered at the end
    assert arrivals[-1][1]["type"] == "exit"
    assert arrivals[-1][1]["exit_code"] == 0


def test_sdk_run_calls_handlers_while_the_command_runs(server: Server) -> None:
    """commands.run(on_stdout=...) sees each line before the command has ended."""
    seen: list[tuple[float, str]] = []
    with Sandbox.create() as sb:
        started = time.monotonic()
        result = sb.commands.run(
            "for i in 1 2 3; do echo $i; sleep 0.5; done; echo oops >&2",
            on_stdout=lambda text: seen.append((time.monotonic() - started, text)),
        )
    assert "".join(text for _, text in seen) == "1\n2\n3\n"
    assert seen[0][0] < 1.0
    assert (result.stdout, result.stderr, result.exit_code) == ("1\n2\n3\n", "oops\n", 0)


# --- background processes ----------------------------------------------------------------


def test_background_http_server_across_execs(server: Server) -> None:
    """A background `python3 -m http.server` keeps serving across other execs, its log
    can be followed, and a signal ends it."""
    with server.client() as client:
        sandbox_id = _sandbox(client)
        base = f"/v1/sandboxes/{sandbox_id}/processes"
        _exec(client, sandbox_id, "mkdir -p /srv/www && echo served > /srv/www/page")
        cmd = ["python3", "-m", "http.server", "8000", "--bind", "127.0.0.1", "-d", "/srv/www"]
        started = client.post(base, json={"cmd": cmd})
        assert started.status_code == 201, started.text
        pid = started.json()["pid"]
        fetch = (
            'python3 -c "import urllib.request as u; '
            "print(u.urlopen('http://127.0.0.1:8000/page').read().decode(), end='')\""
        )
        _until("the server to answer", lambda: _exec(client, sandbox_id, fetch)["exit_code"] == 0)
        for _ in range(3):  # other execs come and go; the server stays
            assert _exec(client, sandbox_id, "echo other")["stdout"] == "other\n"
            assert _exec(client, sandbox_id, fetch)["stdout"] == "served\n"
        assert client.get(f"{base}/{pid}").json()["running"] is True
        listed = client.get(base).json()["processes"]
        assert [(p["pid"], p["running"]) for p in listed] == [(pid, True)]
        events: list[dict[str, Any]] = []
        signalled = False
        with client.stream("GET", f"{base}/{pid}/output", params={"follow": "true"}) as output:
            for line in output.iter_lines():  # its log so far, then live, until it ends
                events.append(json.loads(line))
                if not signalled and "GET /page" in events[-1].get("data", ""):
                    signal = client.post(f"{base}/{pid}/signal", json={"signal": "TERM"})
                    assert signal.status_code == 204, signal.text
                    signalled = True
        log = "".join(e.get("data", "") for e in events)
        assert 'GET /page HTTP/1.1" 200' in log
        assert events[-1]["type"] == "exit"
        status = client.get(f"{base}/{pid}").json()
        assert (status["running"], status["signal"]) == (False, 15)
        assert _exec(client, sandbox_id, fetch)["exit_code"] != 0
        assert client.delete(f"{base}/{pid}").status_code == 204
        assert client.get(f"{base}/{pid}").status_code == 404


def test_sdk_background_handle(server: Server) -> None:
    """run(background=True): send_stdin, wait, kill, and handlers for its output."""
    seen: list[str] = []
    with Sandbox.create() as sb:
        cat = sb.commands.run("cat", background=True, on_stdout=seen.append)
        sb.commands.run("echo meanwhile")
        cat.send_stdin("ping\n")
        cat.send_stdin("pong\n", close=True)
        result = cat.wait()
        assert (result.stdout, result.exit_code) == ("ping\npong\n", 0)
        assert "".join(seen) == "ping\npong\n"
        sleeper = sb.commands.run("sleep 600", background=True)
        assert sleeper.status().running
        sleeper.kill()
        ended = sleeper.wait()
        assert ended.signal == 9
        assert not sleeper.status().running


# --- terminals ---------------------------------------------------------------------------


def _read_until(ws: ClientConnection, pattern: str, timeout_s: float = 30.0) -> str:
    seen = b""
    deadline = time.monotonic() + timeout_s
    while not re.search(pattern, seen.decode(errors="replace")):
        left = deadline - time.monotonic()
        assert left > 0, f"no {pattern!r} in {seen[-500:]!r}"
        message = ws.recv(timeout=left)
        if isinstance(message, bytes):
            seen += message
    return seen.decode(errors="replace")


def test_pty_reports_its_size_resizes_and_ends_with_its_client(server: Server) -> None:
    """`stty size` shows the asked size, then the resized one; `tty` is /dev/pts/N; the
    program ends when the client goes away."""
    with server.client() as client:
        sandbox_id = _sandbox(client)
        url = server.url.replace("http://", "ws://") + f"/v1/sandboxes/{sandbox_id}/pty"
        with connect(f"{url}?cols=100&rows=30") as ws:
            started = json.loads(ws.recv(timeout=30))
            assert started["type"] == "started"
            pid = started["pid"]
            ws.send(b"stty size; tty\n")
            screen = _read_until(ws, r"/dev/pts/\d+")
            assert "30 100\r\n" in screen, screen  # (the echoed command line has no "30 100")
            ws.send(json.dumps({"type": "resize", "cols": 120, "rows": 40}))
            ws.send(b"stty size\n")
            _read_until(ws, r"40 120\r\n")
            listed = client.get(f"/v1/sandboxes/{sandbox_id}/processes").json()["processes"]
            assert [(p["pid"], p["pty"], p["running"]) for p in listed] == [(pid, True, True)]

        def forgotten() -> bool:
            listed = client.get(f"/v1/sandboxes/{sandbox_id}/processes").json()["processes"]
            return pid not in [p["pid"] for p in listed]

        _until("the terminal's program to end", forgotten)
        assert _exec(client, sandbox_id, f"kill -0 {pid}")["exit_code"] != 0


def test_sdk_pty_session(server: Server) -> None:
    """sb.pty.create: a session whose program's exit code comes back."""
    with Sandbox.create() as sb, sb.pty.create(90, 20) as term:
        term.send("stty size; exit 3\n")
        output = b"".join(term).decode(errors="replace")
        assert "20 90" in output
        assert term.exit_code == 3


def test_cli_shell_with_piped_input(server: Server) -> None:
    """`emberbox sandbox shell ID` relays stdin and exits with the shell's status."""
    with Sandbox.create() as sb:
        done = subprocess.run(
            [*_cli(), "sandbox", "shell", sb.id],
            input=b"echo hello-$((6*7)); exit 4\n",
            capture_output=True,
            timeout=120,
            cwd=REPO,
        )
    assert done.returncode == 4, done.stderr
    assert b"hello-42" in done.stdout


def _cli() -> list[str]:
    return [sys.executable, "-c", "import sys; from emberbox.cli import main; sys.exit(main())"]


# --- files -------------------------------------------------------------------------------


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
        sandbox_id = _sandbox(client)
        files = f"/v1/sandboxes/{sandbox_id}/files"

        def read(path: str) -> httpx.Response:
            return client.get(files, params={"path": path})

        guest_only = "/etc/emberbox-guest-marker"
        _exec(client, sandbox_id, f"echo guest-$(hostname) > {guest_only}")
        assert not Path(guest_only).exists()  # (not on the host)
        guest_name = read(guest_only).text
        assert guest_name.startswith("guest-emberbox-"), guest_name
        for same in (guest_only[1:], f"/tmp/..{guest_only}", f"../../../..{guest_only}"):
            assert read(same).text == guest_name, same
        put = client.put(files, params={"path": "/tmp/../root/dotdot.txt"}, content=b"in root")
        assert put.status_code == 200, put.text
        assert _exec(client, sandbox_id, "cat /root/dotdot.txt")["stdout"] == "in root"
        _exec(client, sandbox_id, f"ln -s /etc /tmp/etc-link; ln -s {marker} /tmp/host-link")
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
            [*_cli(), "cp", str(tree), f"{sb.id}:/opt/tree"], capture_output=True, cwd=REPO
        )
        assert copied.returncode == 0, copied.stderr
        assert sb.files.read("/opt/tree/sub/b.bin") == bytes(range(256))
        fetched = subprocess.run(
            [*_cli(), "cp", f"{sb.id}:/opt/tree/a.txt", "-"], capture_output=True, cwd=REPO
        )
        assert (fetched.returncode, fetched.stdout) == (0, b"A")


def _put_archive(sandbox_id: str, members: dict[str, bytes]) -> httpx.Response:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    url = os.environ["EMBERBOX_URL"]
    return httpx.put(
        f"{url}/v1/sandboxes/{sandbox_id}/archive",
        params={"path": "/tmp/x"},
        content=buffer.getvalue(),
        timeout=60,
    )


def test_upload_limit_is_413(data_dir: Path, default_image: ImageInfo) -> None:
    """Past EMBERBOX_MAX_UPLOAD_BYTES: 413 up front with a Content-Length, 413 once
    counted for a chunked body; the old file is untouched."""
    limited_server = serve_emberbox(data_dir, EMBERBOX_MAX_UPLOAD_BYTES=str(MIB))
    with limited_server as limited, limited.client() as client:
        sandbox_id = _sandbox(client)
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
        leftovers = _exec(client, sandbox_id, "ls -A /root")["stdout"].split()
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
