"""Terminals over a WebSocket: bytes both ways, resizes, the program's exit and the close
codes of errors."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from emberbox.api import create_app
from emberbox.config import Settings
from tests.support.fakes_manager import FakeManager
from tests.support.servers import serving


def _wait_until(predicate: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _ws_url(url: str, sandbox_id: str, query: str = "") -> str:
    return url.replace("http://", "ws://") + f"/v1/sandboxes/{sandbox_id}/pty{query}"


def _closed_code(ws: ClientConnection) -> int | None:
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=5)
    return closed.value.rcvd.code if closed.value.rcvd else None


def test_pty_websocket_relays_bytes_and_resizes(app: FastAPI, manager: FakeManager) -> None:
    """Binary frames both ways; a resize text frame resizes; leaving ends the program."""
    with serving(app) as url:
        sandbox_id = httpx.post(f"{url}/v1/sandboxes", json={}).json()["id"]
        guest = manager.guests[sandbox_id]
        with connect(_ws_url(url, sandbox_id, "?cols=100&rows=30")) as ws:
            started = json.loads(ws.recv(timeout=5))
            assert started["type"] == "started"
            pid = started["pid"]
            assert guest.processes[pid].pty == (100, 30)
            ws.send(b"ls\r")
            assert ws.recv(timeout=5) == b"ls\r"
            ws.send(json.dumps({"type": "resize", "cols": 120, "rows": 40}))
            _wait_until(lambda: guest.resizes == [(pid, 120, 40)])
        _wait_until(lambda: pid not in guest.processes)
        assert (pid, "KILL") in guest.signals
        with connect(_ws_url(url, sandbox_id)) as ws:
            pid = json.loads(ws.recv(timeout=5))["pid"]
            ws.send("not json")
            assert json.loads(ws.recv(timeout=5))["error"]["type"] == "InvalidRequest"
            assert _closed_code(ws) == 4400
        _wait_until(lambda: pid not in guest.processes)


def test_pty_program_exit_closes_with_its_status(app: FastAPI, manager: FakeManager) -> None:
    """When the program ends the server sends its exit event and closes normally."""
    with serving(app) as url:
        sandbox_id = httpx.post(f"{url}/v1/sandboxes", json={}).json()["id"]
        with connect(_ws_url(url, sandbox_id)) as ws:
            pid = json.loads(ws.recv(timeout=5))["pid"]
            assert manager.guests[sandbox_id].processes[pid].pty == (80, 24)
            ws.send(b"exit 7")
            assert ws.recv(timeout=5) == b"exit 7"
            assert json.loads(ws.recv(timeout=5)) == {
                "type": "exit",
                "exit_code": 7,
                "signal": None,
                "duration_ms": 12.5,
                "timed_out": False,
                "output_truncated": False,
                "memory_limited": False,
            }
            assert _closed_code(ws) == 1000


def test_pty_errors_close_with_4000_plus_status(tmp_path: Path, manager: FakeManager) -> None:
    """An unknown sandbox closes with 4404 after an error frame; a wrong key with 4401."""
    keyed = Settings(data_dir=tmp_path / "k", api_key="s3cret")
    app = create_app(keyed, manager, registry=manager.registry)  # type: ignore[arg-type]
    with serving(app) as url:
        headers = {"Authorization": "Bearer s3cret"}
        with connect(_ws_url(url, "nope"), additional_headers=headers) as ws:
            assert json.loads(ws.recv(timeout=5))["error"]["type"] == "NotFound"
            assert _closed_code(ws) == 4404
        with connect(_ws_url(url, "nope")) as ws:
            assert json.loads(ws.recv(timeout=5))["error"]["type"] == "Unauthorized"
            assert _closed_code(ws) == 4401
