"""Servers for tests: the real ``emberbox serve`` in a subprocess (:func:`serve_emberbox`,
used by the integration and hostile suites) and an ASGI app under uvicorn in a thread
(:func:`serving`, used by the SDK and CLI unit tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from pydantic import SecretStr

from emberbox.config import Settings
from tests.support.paths import REPO

START_WAIT_S = 60.0
BOOT_WAIT_S = 300.0  # several boots at once under TCG can be slow


@dataclass(frozen=True)
class Server:
    url: str
    settings: Settings  # what the server runs with (data dir, limits)
    log_path: Path
    process: subprocess.Popen[bytes]

    @property
    def headers(self) -> dict[str, str]:
        """The server's own admin key, when it runs with ``EMBERBOX_API_KEY``."""
        key = self.settings.api_key
        return {"Authorization": f"Bearer {key.get_secret_value()}"} if key else {}

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=BOOT_WAIT_S, headers=self.headers)

    def async_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=BOOT_WAIT_S, headers=self.headers)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@contextmanager
def serve_emberbox(data_dir: Path, **env: str) -> Iterator[Server]:
    """``emberbox serve`` on a free port with ``EMBERBOX_DATA_DIR=data_dir``.

    On the way out every sandbox is killed through the API (the manager leaves running
    sandboxes running when it closes), then the server gets SIGTERM.
    """
    port = free_port()
    env = {**os.environ, "EMBERBOX_DATA_DIR": str(data_dir), **env}
    env.pop("EMBERBOX_URL", None)
    log_path = data_dir / "server.log"
    command = [sys.executable, "-c", "import sys; from emberbox.cli import main; sys.exit(main())"]
    command += ["serve", "--host", "127.0.0.1", "--port", str(port)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=log)
    key = env.get("EMBERBOX_API_KEY")
    settings = Settings(data_dir=data_dir, api_key=SecretStr(key) if key is not None else None)
    server = Server(f"http://127.0.0.1:{port}", settings, log_path, process)
    try:
        _wait_until_up(server, process)
        yield server
    finally:
        try:
            if process.poll() is None:
                _kill_all(server)
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            print(f"--- server log ---\n{log_path.read_text(errors='replace')[-8000:]}")


def _wait_until_up(server: Server, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_WAIT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {server.log_path.read_text(errors='replace')}")
        try:
            if httpx.get(f"{server.url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError("server did not answer /healthz in time")


def _kill_all(server: Server) -> None:
    with server.client() as client:
        for sandbox in client.get("/v1/sandboxes").json()["sandboxes"]:
            if sandbox["state"] != "stopped":
                client.delete(f"/v1/sandboxes/{sandbox['id']}")


@contextmanager
def serving(app: Any, *, lifespan: bool = False) -> Iterator[str]:
    """Run ``app`` under a real uvicorn server on a free port in a thread; yield its URL.
    With ``lifespan``, the app's lifespan runs too (its start before the URL is given)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_level="warning", ws="websockets-sansio", lifespan="on" if lifespan else "off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
