"""Servers inside a sandbox without a network, reached through the API (the agent's
``connect`` op): HTTP streaming, WebSockets, tenancy, public URLs, ``port-forward``."""

from __future__ import annotations

import hashlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from emberbox.images.registry import ImageInfo
from emberbox.sdk import Sandbox
from tests.support.keys import make_key
from tests.support.paths import REPO, short_tmp_dir
from tests.support.servers import Server, free_port, serve_emberbox

pytestmark = [pytest.mark.vm]

BIG_MIB = 20
HTTP_PORT, ECHO_PORT = 8000, 8765

# A WebSocket echo server with the standard library only (the guest has no `websockets`).
ECHO_SERVER = r"""
import base64, hashlib, socket, struct, threading
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
def exact(conn, n):
    data = b""
    while len(data) < n:
        more = conn.recv(n - len(data))
        if not more:
            raise EOFError
        data += more
    return data
def serve(conn):
    head = b""
    while b"\r\n\r\n" not in head:
        head += conn.recv(4096)
    key = [l.split(b":", 1)[1].strip() for l in head.split(b"\r\n")
           if l.lower().startswith(b"sec-websocket-key:")][0]
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
    try:
        while True:
            b1, b2 = exact(conn, 2)
            opcode, size = b1 & 0x0F, b2 & 0x7F
            if size == 126:
                size = struct.unpack(">H", exact(conn, 2))[0]
            elif size == 127:
                size = struct.unpack(">Q", exact(conn, 8))[0]
            mask = exact(conn, 4)
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(exact(conn, size)))
            if size < 126:
                header = bytes([0x80 | opcode, size])
            elif size < 65536:
                header = bytes([0x80 | opcode, 126]) + struct.pack(">H", size)
            else:
                header = bytes([0x80 | opcode, 127]) + struct.pack(">Q", size)
            conn.sendall(header + data)
            if opcode == 8:
                return
    except EOFError:
        return
    finally:
        conn.close()
listener = socket.create_server(("127.0.0.1", PORT))
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


@dataclass(frozen=True)
class Setup:
    server: Server
    alice: str
    bob: str
    sandbox_id: str
    big_sha256: str

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.alice}"}

    def port_url(self, port: int, path: str = "") -> str:
        return f"{self.server.url}/v1/sandboxes/{self.sandbox_id}/ports/{port}/{path}"


@pytest.fixture(scope="module")
def setup(default_image: ImageInfo) -> Iterator[Setup]:
    """One server, keys of two tenants, and alice's sandbox (egress none) running an HTTP
    server on 8000 over a 20 MiB file and a WebSocket echo server on 8765."""
    data_dir = short_tmp_dir("eb-ports-")
    try:
        admin = secrets.token_urlsafe(24)  # the server's own key: its teardown lists all
        with serve_emberbox(data_dir, EMBERBOX_POOL_SIZE="0", EMBERBOX_API_KEY=admin) as server:
            alice = make_key(data_dir, "--name", "alice")
            bob = make_key(data_dir, "--name", "bob")
            with Sandbox.create(url=server.url, api_key=alice) as sb:
                assert sb.info().ip_address is None  # no network at all
                sb.commands.run(f"mkdir -p /srv && head -c {BIG_MIB << 20} /dev/urandom > /srv/big")
                digest = sb.commands.run("sha256sum /srv/big").stdout.split()[0]
                sb.files.write("/tmp/echo.py", ECHO_SERVER.replace("PORT", str(ECHO_PORT)))
                sb.commands.run(f"python3 -m http.server {HTTP_PORT} -d /srv", background=True)
                sb.commands.run("python3 /tmp/echo.py", background=True)
                setup = Setup(server, alice, bob, sb.id, digest)
                _wait_for(setup)
                yield setup
    finally:
        subprocess.run(["rm", "-rf", str(data_dir)], check=False)


def _wait_for(setup: Setup) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        got = httpx.get(setup.port_url(HTTP_PORT), headers=setup.headers(), timeout=30)
        if got.status_code == 200:
            return
        time.sleep(0.5)
    raise AssertionError(f"the guest's http.server did not come up: {got.text}")


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_http_server_in_a_sandbox_without_network(setup: Setup) -> None:
    """GET /ports/8000/ lists the directory; a 20 MiB file streams through whole and
    intact while the server's peak memory grows by far less than the file."""
    listing = httpx.get(setup.port_url(HTTP_PORT), headers=setup.headers(), timeout=30)
    assert listing.status_code == 200 and "big" in listing.text
    before = _peak_rss_kib(setup.server.process.pid)
    digest, size = hashlib.sha256(), 0
    started = time.monotonic()
    url = setup.port_url(HTTP_PORT, "big")
    with httpx.stream("GET", url, headers=setup.headers(), timeout=120) as response:
        assert response.status_code == 200
        for chunk in response.iter_bytes():
            digest.update(chunk)
            size += len(chunk)
    seconds = time.monotonic() - started
    grown_mib = (_peak_rss_kib(setup.server.process.pid) - before) / 1024
    rate = BIG_MIB / seconds
    print(f"{BIG_MIB} MiB in {seconds:.1f} s ({rate:.1f} MiB/s), peak +{grown_mib:.1f} MiB")
    assert (size, digest.hexdigest()) == (BIG_MIB << 20, setup.big_sha256)
    assert grown_mib < BIG_MIB / 2


def test_websocket_round_trips(setup: Setup) -> None:
    """A WebSocket through /ports/8765/ reaches the guest's echo server, both ways."""
    ws_url = setup.port_url(ECHO_PORT, "echo").replace("http://", "ws://")
    with connect(ws_url, additional_headers=setup.headers()) as ws:
        ws.send("hello")
        assert ws.recv(timeout=30) == "hello"
        payload = os.urandom(200_000)
        ws.send(payload)
        assert ws.recv(timeout=30) == payload


def test_another_tenant_gets_the_unknown_id_answer(setup: Setup) -> None:
    """Bob's key on alice's sandbox port: the same 404 as a sandbox that does not exist."""
    theirs = httpx.get(setup.port_url(HTTP_PORT), headers=setup.headers(setup.bob), timeout=30)
    unknown_url = f"{setup.server.url}/v1/sandboxes/nosuchsandbox/ports/{HTTP_PORT}/"
    unknown = httpx.get(unknown_url, headers=setup.headers(setup.bob), timeout=30)
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.json()["error"]["type"] == unknown.json()["error"]["type"] == "NotFound"
    assert httpx.get(setup.port_url(HTTP_PORT), timeout=30).status_code == 401


def test_public_url_works_without_a_key_until_revoked(setup: Setup) -> None:
    """A public port opens with no key; once revoked, the same URL is a 404."""
    port_api = f"{setup.server.url}/v1/sandboxes/{setup.sandbox_id}/ports/{HTTP_PORT}"
    made = httpx.post(port_api, json={"public": True}, headers=setup.headers(), timeout=30)
    assert made.status_code == 200, made.text
    public = setup.server.url + made.json()["url"]
    assert "big" in httpx.get(public, timeout=30).text
    revoked = httpx.post(port_api, json={"public": False}, headers=setup.headers(), timeout=30)
    assert revoked.json()["public"] is False
    assert httpx.get(public, timeout=30).status_code == 404


def test_a_port_nothing_listens_on_is_a_502(setup: Setup) -> None:
    """Nothing on port 9: a prompt 502 PortUnreachable with a message, not a hang."""
    started = time.monotonic()
    got = httpx.get(setup.port_url(9), headers=setup.headers(), timeout=30)
    assert got.status_code == 502
    assert got.json()["error"]["type"] == "PortUnreachable"
    assert "refused" in got.json()["error"]["message"].lower()
    assert time.monotonic() - started < 15


def test_port_forward_then_ctrl_c(setup: Setup) -> None:
    """`emberbox port-forward ID LOCAL:8000` serves the guest's server on localhost:LOCAL;
    SIGINT ends it cleanly (no traceback, exit 0)."""
    local = free_port()
    env = {**os.environ, "EMBERBOX_URL": setup.server.url, "EMBERBOX_API_KEY": setup.alice}
    command = [sys.executable, "-c", "import sys; from emberbox.cli import main; sys.exit(main())"]
    forward = subprocess.Popen(
        [*command, "port-forward", setup.sandbox_id[:6], f"{local}:{HTTP_PORT}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert forward.stdout is not None
        assert forward.stdout.readline().startswith(f"Forwarding from 127.0.0.1:{local} ->")
        assert "big" in httpx.get(f"http://127.0.0.1:{local}/", timeout=30).text
        head = httpx.head(f"http://127.0.0.1:{local}/big", timeout=30)
        assert int(head.headers["content-length"]) == BIG_MIB << 20
    finally:
        forward.send_signal(signal.SIGINT)
        _, stderr = forward.communicate(timeout=30)
    assert forward.returncode == 0, stderr
    assert "Traceback" not in stderr
