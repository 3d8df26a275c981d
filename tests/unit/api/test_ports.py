"""``/v1/sandboxes/{id}/ports/...`` over the fake manager: the fake guest's ports are
sockets on this host, so the relay (HTTP, WebSocket, raw TCP, public URLs) is real."""

from __future__ import annotations

import asyncio
import http.server
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr
from websockets.asyncio.server import ServerConnection, serve
from websockets.sync.client import connect

from emberbox.config import Settings
from tests.support.fakes_manager import FakeManager, fake_app
from tests.support.servers import serving


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"path={self.path} auth={self.headers.get('Authorization')}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(length)[::-1]
        self.send_response(201)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_port() -> Iterator[int]:
    """An HTTP server on this host (it stands for one in the guest)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A WebSocket echo server on this host, in its own loop."""
    ready: list[int] = []
    stop = threading.Event()

    async def echo(connection: ServerConnection) -> None:
        async for message in connection:
            await connection.send(message)

    async def main() -> None:
        async with serve(echo, "127.0.0.1", 0) as server:
            ready.append(next(iter(server.sockets)).getsockname()[1])
            await asyncio.to_thread(stop.wait)

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    while not ready:
        threading.Event().wait(0.01)
    yield ready[0]
    stop.set()
    thread.join(5)


KEY = {"Authorization": "Bearer test-key"}


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, FakeManager, str]]:
    """The real app (key ``test-key``) on a free port, with one running fake sandbox:
    (url, manager, id)."""
    settings = Settings(
        data_dir=tmp_path / "data", cache_dir=tmp_path / "cache", api_key=SecretStr("test-key")
    )
    app, manager = fake_app(tmp_path, settings)
    with serving(app) as url:
        created = httpx.post(f"{url}/v1/sandboxes", json={}, headers=KEY, timeout=10)
        yield url, manager, created.json()["id"]


def test_http_is_relayed_without_the_api_key(
    served: tuple[str, FakeManager, str], http_port: int
) -> None:
    """GET and POST reach the guest's server with the path and query; the caller's API
    key is not passed on; a port nothing listens on is a 502 that says so."""
    url, manager, sandbox_id = served
    manager.guests[sandbox_id].ports[8000] = http_port
    base = f"{url}/v1/sandboxes/{sandbox_id}/ports/8000"
    got = httpx.get(f"{base}/a/b?x=1", headers=KEY, timeout=10)
    assert (got.status_code, got.text) == (200, "path=/a/b?x=1 auth=None")
    posted = httpx.post(f"{base}/", content=b"abc" * 100_000, headers=KEY, timeout=10)
    assert (posted.status_code, posted.content) == (201, b"cba" * 100_000)
    missing = httpx.get(f"{url}/v1/sandboxes/{sandbox_id}/ports/9/", headers=KEY, timeout=10)
    assert missing.status_code == 502
    assert missing.json()["error"]["type"] == "PortUnreachable"
    assert "port 9" in missing.json()["error"]["message"]
    assert manager.ports.open_count(sandbox_id) == 0


def test_public_url_works_without_a_key_until_revoked(
    served: tuple[str, FakeManager, str], http_port: int
) -> None:
    """POST .../ports/8000 {"public": true} gives a URL that works with no key and keeps
    the caller's Authorization; {"public": false} revokes it (404)."""
    url, manager, sandbox_id = served
    manager.guests[sandbox_id].ports[8000] = http_port
    port_url = f"{url}/v1/sandboxes/{sandbox_id}/ports/8000"
    assert httpx.get(f"{port_url}/x", timeout=10).status_code == 401
    made = httpx.post(port_url, json={"public": True}, headers=KEY)
    public_url = made.json()["url"]
    assert made.json()["public"] is True and len(public_url) > 40
    got = httpx.get(f"{url}{public_url}x", headers={"Authorization": "Basic app"}, timeout=10)
    assert (got.status_code, got.text) == (200, "path=/x auth=Basic app")
    httpx.post(port_url, json={"public": False}, headers=KEY)
    assert httpx.get(f"{url}{public_url}x", timeout=10).status_code == 404


def test_websocket_and_raw_tcp_are_relayed(
    served: tuple[str, FakeManager, str], echo_port: int, http_port: int
) -> None:
    """A WebSocket to the guest echoes text and binary messages; the raw TCP route
    carries an HTTP exchange byte for byte."""
    url, manager, sandbox_id = served
    manager.guests[sandbox_id].ports.update({7000: echo_port, 8000: http_port})
    ws_base = url.replace("http://", "ws://") + f"/v1/sandboxes/{sandbox_id}"
    with connect(f"{ws_base}/ports/7000/echo", additional_headers=KEY) as ws:
        ws.send("hello")
        assert ws.recv() == "hello"
        ws.send(b"\x00\x01" * 70_000)
        assert ws.recv() == b"\x00\x01" * 70_000
    with connect(f"{ws_base}/tcp/8000", additional_headers=KEY) as raw:
        raw.send(b"GET /raw HTTP/1.0\r\n\r\n")
        raw.send(b"")
        received = b""
        with pytest.raises(Exception):  # noqa: B017 - the server closes when done
            while True:
                received += raw.recv(timeout=10)  # type: ignore[operator]
    assert received.startswith(b"HTTP/1.0 200") and received.endswith(b"path=/raw auth=None")


def test_tunnels_per_sandbox_are_capped(tmp_path: Path) -> None:
    """Past max_tunnels_per_sandbox a new connection is refused (403 naming the quota)."""
    settings = Settings(
        data_dir=tmp_path / "data",
        cache_dir=tmp_path / "cache",
        api_key=SecretStr("test-key"),
        max_tunnels_per_sandbox=1,
    )
    app, manager = fake_app(tmp_path, settings)
    with socket.socket() as listener, serving(app) as url:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        created = httpx.post(f"{url}/v1/sandboxes", json={}, headers=KEY, timeout=10)
        sandbox_id = created.json()["id"]
        manager.guests[sandbox_id].ports[5000] = listener.getsockname()[1]
        ws_url = url.replace("http://", "ws://") + f"/v1/sandboxes/{sandbox_id}/tcp/5000"
        with connect(ws_url, additional_headers=KEY):
            refused = httpx.get(
                f"{url}/v1/sandboxes/{sandbox_id}/ports/5000/", headers=KEY, timeout=10
            )
            assert refused.status_code == 403
            assert refused.json()["error"]["quota"] == "max_tunnels_per_sandbox"
