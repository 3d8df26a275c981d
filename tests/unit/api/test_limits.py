"""Request bodies under hostile load (``api/limits.py``): who calls is known before a
byte of the body is read, bodies stop at their limit and deadline, bulk fields are
bounded, and keyless mode answers only loopback callers that name this host."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx
import pytest
from fastapi import FastAPI

from emberbox.api import create_app
from emberbox.config import Settings
from tests.support.fakes_manager import FakeManager, FakeRegistry

pytestmark = pytest.mark.anyio

KEY = "s3cret-key"


@dataclass
class Exchange:
    """One request driven by hand over ASGI: its body in chunks, what the app read."""

    chunks: list[bytes]
    delay_s: float = 0.0
    read: int = 0  # body chunks the app took
    messages: list[dict[str, object]] = field(default_factory=list)

    async def receive(self) -> dict[str, object]:
        if self.read >= len(self.chunks):
            await anyio.sleep_forever()
        await anyio.sleep(self.delay_s)
        self.read += 1
        more = self.read < len(self.chunks)
        return {"type": "http.request", "body": self.chunks[self.read - 1], "more_body": more}

    async def send(self, message: dict[str, object]) -> None:
        self.messages.append(message)

    @property
    def status(self) -> int:
        starts = [m for m in self.messages if m["type"] == "http.response.start"]
        assert len(starts) == 1, self.messages
        return int(starts[0]["status"])  # type: ignore[call-overload]

    @property
    def body(self) -> dict[str, object]:
        data = b"".join(
            m.get("body", b"") for m in self.messages if m["type"] == "http.response.body"
        )  # type: ignore[misc]
        loaded: dict[str, object] = json.loads(data)
        return loaded


async def drive(
    app: FastAPI,
    path: str,
    chunks: list[bytes],
    *,
    headers: dict[str, str] | None = None,
    method: str = "POST",
    delay_s: float = 0.0,
) -> Exchange:
    exchange = Exchange(chunks, delay_s)
    sent = {"host": "localhost", "content-type": "application/json", **(headers or {})}
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in sent.items()],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8080),
    }
    with anyio.fail_after(10):
        await app(scope, exchange.receive, exchange.send)  # type: ignore[arg-type]
    return exchange


def keyed_app(tmp_path: Path, **overrides: object) -> FastAPI:
    settings = Settings(
        data_dir=tmp_path / "data", cache_dir=tmp_path / "cache", api_key=KEY, **overrides
    )
    registry = FakeRegistry(tmp_path / "images")
    return create_app(settings, FakeManager(settings, registry), registry=registry)  # type: ignore[arg-type]


def big_body(size: int, piece: int = 64 * 1024) -> list[bytes]:
    text = json.dumps({"cmd": ["echo", "x" * size]}).encode()
    return [text[i : i + piece] for i in range(0, len(text), piece)]


async def test_an_unauthenticated_body_is_refused_before_it_is_read(tmp_path: Path) -> None:
    """A 16 MB body without a key is a 401 after reading none of it (issue #15: the body
    was read and parsed first, +409 MiB)."""
    chunks = big_body(16 << 20)
    exchange = await drive(keyed_app(tmp_path), "/v1/sandboxes/sb-1/exec", chunks)
    assert exchange.status == 401
    assert exchange.read == 0


async def test_a_body_over_the_limit_is_413_once_the_limit_is_passed(tmp_path: Path) -> None:
    """With a key and no Content-Length, a 16 MB body is cut off with 413 as soon as it
    passes max_request_body_bytes: the rest is never read."""
    chunks = big_body(16 << 20)
    headers = {"authorization": f"Bearer {KEY}"}
    exchange = await drive(keyed_app(tmp_path), "/v1/sandboxes/sb-1/exec", chunks, headers=headers)
    assert exchange.status == 413
    assert exchange.body["error"] == {
        "type": "PayloadTooLarge",
        "message": exchange.body["error"]["message"],  # type: ignore[index]
        "quota": "max_request_body_bytes",
        "limit": 1 << 20,
    }
    assert exchange.read <= (1 << 20) // (64 * 1024) + 1 < len(chunks)


async def test_a_declared_length_over_the_limit_is_413_unread(tmp_path: Path) -> None:
    """A Content-Length over the limit is refused before the body (and the key) is read."""
    headers = {"content-length": str(16 << 20)}
    exchange = await drive(
        keyed_app(tmp_path), "/v1/sandboxes", big_body(16 << 20), headers=headers
    )
    assert (exchange.status, exchange.read) == (413, 0)


async def test_a_slow_body_is_408(tmp_path: Path) -> None:
    """A JSON body must arrive whole within request_body_timeout_s."""
    app = keyed_app(tmp_path, request_body_timeout_s=0.3)
    headers = {"authorization": f"Bearer {KEY}"}
    chunks = [b'{"cmd": ', b'"true"', b"}"]
    exchange = await drive(app, "/v1/sandboxes", chunks, headers=headers, delay_s=0.2)
    assert exchange.status == 408
    assert exchange.body["error"]["type"] == "RequestTimeout"  # type: ignore[index]


async def test_uploads_keep_their_own_limit(client: httpx.AsyncClient) -> None:
    """A raw upload is not held to the JSON limit: it reaches its route (404 for an
    unknown sandbox here, not 413)."""
    body = b"x" * (2 << 20)
    answer = await client.put("/v1/sandboxes/nope/files", params={"path": "/a"}, content=body)
    assert answer.status_code == 404


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"cmd": "true", "env": {"A": "x" * (32 * 1024 + 1)}}, "env.A"),
        ({"cmd": ["echo", "x" * (128 * 1024 + 1)]}, "cmd"),
        ({"cmd": "x" * (128 * 1024 + 1)}, "cmd"),
        ({"cmd": "cat", "stdin": "x" * (512 * 1024 + 1)}, "stdin"),
    ],
)
async def test_bulk_fields_are_bounded(client: httpx.AsyncClient, body: object, where: str) -> None:
    """An env value, an argument, a shell line or stdin over its bound is a 422 naming
    the field, never a 500 (issue #15: 1 MiB of stdin was a 500, a 20 MB env value 201)."""
    answer = await client.post("/v1/sandboxes/nope/exec", json=body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["message"].startswith(where)


@pytest.mark.parametrize(
    ("client_host", "host_header", "served"),
    [
        ("127.0.0.1", "localhost:8080", True),
        ("127.0.0.1", "127.0.0.1:8080", True),
        ("::1", "[::1]:8080", True),
        ("127.0.0.1", "app.localhost", True),
        ("10.0.0.7", "localhost", False),  # a client beyond loopback (a factory on 0.0.0.0)
        ("127.0.0.1", "evil.example:8080", False),  # DNS rebinding from a browser page
    ],
)
async def test_keyless_mode_wants_a_loopback_client_and_a_local_host(
    tmp_path: Path, client_host: str, host_header: str, served: bool
) -> None:
    """Keyless requests are served only from loopback clients naming a local Host."""
    settings = Settings(data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")
    registry = FakeRegistry(tmp_path / "images")
    app = create_app(settings, FakeManager(settings, registry), registry=registry)  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=app, client=(client_host, 5000))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
        answer = await http.get("/v1/sandboxes", headers={"host": host_header})
    assert answer.status_code == (200 if served else 401), answer.text
