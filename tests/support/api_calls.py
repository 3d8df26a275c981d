"""Calls the API unit tests make to the app in-process (``httpx.AsyncClient`` over ASGI):
create a sandbox, start a process, and read what comes back (an error body, NDJSON).

The app runs over :class:`tests.support.fakes_manager.FakeManager`."""

from __future__ import annotations

import json
from typing import Any

import httpx

UPLOAD_LIMIT = 64 * 1024
"""``max_upload_bytes`` of the guest route tests (``tests/unit/api/guest``)."""


async def create_sandbox(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    """POST /v1/sandboxes with ``body`` (it must answer 201); the sandbox as answered."""
    response = await client.post("/v1/sandboxes", json=body)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


async def new_sandbox(client: httpx.AsyncClient) -> str:
    """A new sandbox whose env has ``FROM_SANDBOX=1``; its id."""
    response = await client.post("/v1/sandboxes", json={"env": {"FROM_SANDBOX": "1"}})
    assert response.status_code == 201, response.text
    sandbox_id: str = response.json()["id"]
    return sandbox_id


async def start_process(client: httpx.AsyncClient, sandbox_id: str, **body: Any) -> int:
    """POST .../processes with ``body`` (it must answer 201); the process's pid."""
    response = await client.post(f"/v1/sandboxes/{sandbox_id}/processes", json=body)
    assert response.status_code == 201, response.text
    pid: int = response.json()["pid"]
    return pid


def error_message(response: httpx.Response, status: int, type_name: str) -> str:
    """Checks that ``response`` is a ``status`` whose error is a ``type_name``; its message."""
    assert response.status_code == status, response.text
    assert response.json()["error"]["type"] == type_name, response.text
    message: str = response.json()["error"]["message"]
    return message


def error_body(response: httpx.Response, status: int, type_name: str) -> str:
    """Like :func:`error_message`, and also checks that the body is nothing but the error
    and that its message is not empty; the message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["type"] == type_name
    message: str = body["error"]["message"]
    assert message
    return message


def ndjson_events(response: httpx.Response) -> list[dict[str, Any]]:
    """The events of a 200 NDJSON answer (every line ended), in order."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-ndjson"
    assert response.text.endswith("\n")
    return [json.loads(line) for line in response.text.splitlines()]
