"""Calls the integration tests make to a real ``emberbox serve``
(:class:`tests.support.servers.Server`) with a sync httpx client, and the command line
of this checkout's CLI."""

from __future__ import annotations

import sys
from typing import Any

import httpx

from tests.support.keys import CLI


def new_sandbox(client: httpx.Client, **body: Any) -> str:
    """POST /v1/sandboxes with ``body`` (it must answer 201); the new sandbox's id."""
    response = client.post("/v1/sandboxes", json=body)
    assert response.status_code == 201, response.text
    sandbox_id: str = response.json()["id"]
    return sandbox_id


def run_command(client: httpx.Client, sandbox_id: str, cmd: str | list[str]) -> dict[str, Any]:
    """Exec ``cmd`` in the sandbox with a 60 s timeout (it must answer 200); the result."""
    response = client.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"cmd": cmd, "timeout_s": 60})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def cli_argv() -> list[str]:
    """``emberbox`` run by this interpreter, from this checkout."""
    return [sys.executable, "-c", CLI]
