"""Exec over HTTP, and the status codes and bodies of the errors it meets."""

from __future__ import annotations

import httpx
import pytest

from emberbox import errors
from emberbox.agent_client.client import ExecResult
from tests.support.api_calls import create_sandbox, error_body
from tests.support.fakes_manager import FakeManager

pytestmark = pytest.mark.anyio


async def test_exec_returns_decoded_output(client: httpx.AsyncClient, manager: FakeManager) -> None:
    """Exec sends stdin as bytes and answers text, invalid UTF-8 replaced."""
    sandbox_id = (await create_sandbox(client))["id"]
    body = {"cmd": ["echo", "hi"], "stdin": "é", "env": {"X": "1"}, "cwd": "/tmp"}
    response = await client.post(f"/v1/sandboxes/{sandbox_id}/exec", json=body)
    assert response.status_code == 200
    result = response.json()
    assert result["stdout"] == f"éran echo hi in {sandbox_id}\n"
    assert result["stderr"] == "err\ufffd\n"
    assert (result["exit_code"], result["timed_out"]) == (0, False)
    assert manager.calls[-1] == (
        "exec",
        {"cmd": ["echo", "hi"], "env": {"X": "1"}, "cwd": "/tmp", "stdin": "é".encode()},
    )


async def test_exec_in_a_stopped_sandbox_is_409(client: httpx.AsyncClient) -> None:
    """Conflict from the manager is a 409."""
    sandbox_id = (await create_sandbox(client))["id"]
    await client.delete(f"/v1/sandboxes/{sandbox_id}")
    response = await client.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"cmd": "true"})
    error_body(response, 409, "Conflict")


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"cmd": []}', "cmd"),
        (b'{"cmd": ""}', "cmd"),
        (b'{"cmd": "  "}', "cmd"),
        (b'{"cmd": ["a\\u0000b"]}', "cmd"),
        (b'{"cmd": "x", "timeout_s": 0}', "timeout_s"),
        (b'{"cmd": "x", "timeout_s": NaN}', "timeout_s"),
        (b'{"cmd": "x", "timeout_s": Infinity}', "timeout_s"),
        (b'{"cmd": 5}', "cmd"),
        (b'{"command": "x"}', "cmd"),
    ],
)
async def test_bad_exec_bodies_are_422(client: httpx.AsyncClient, raw: bytes, field: str) -> None:
    """Exec bodies that break the schema are 422 naming the field."""
    sandbox_id = (await create_sandbox(client))["id"]
    response = await client.post(
        f"/v1/sandboxes/{sandbox_id}/exec",
        content=raw,
        headers={"content-type": "application/json"},
    )
    assert field in error_body(response, 422, "ValidationError")


async def test_exec_timeout_with_partial_result_answers_timed_out(
    client: httpx.AsyncClient, manager: FakeManager
) -> None:
    """ExecTimeout carrying a result is a 200 with timed_out; without one it is a 504."""
    sandbox_id = (await create_sandbox(client))["id"]
    partial = ExecResult(-9, b"partial", b"", duration_ms=1000.0, signal=9)
    manager.raise_on_exec = errors.ExecTimeout("ran past 1 s", result=partial)
    response = await client.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"cmd": "sleep 9"})
    assert response.status_code == 200
    assert response.json()["timed_out"] is True
    assert response.json()["stdout"] == "partial"
    manager.raise_on_exec = errors.ExecTimeout("ran past 1 s")
    response = await client.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"cmd": "sleep 9"})
    error_body(response, 504, "ExecTimeout")


async def test_vmm_error_body_carries_the_console_tail(
    client: httpx.AsyncClient, manager: FakeManager
) -> None:
    """A VMMError is a 502 whose message is the message and whose console tail is a field."""
    sandbox_id = (await create_sandbox(client))["id"]
    manager.raise_on_exec = errors.VMMCrashed("qemu died", console_tail="Kernel panic")
    response = await client.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"cmd": "true"})
    assert error_body(response, 502, "VMMCrashed") == "qemu died"
    assert response.json()["error"]["console_tail"] == "Kernel panic"


async def test_unexpected_exception_is_a_500_with_the_same_body(
    client: httpx.AsyncClient, manager: FakeManager
) -> None:
    """A bug (any other exception) is a 500 with the usual body and no details leaked."""
    sandbox_id = (await create_sandbox(client))["id"]
    manager.raise_on_exec = RuntimeError("secret internals")  # type: ignore[assignment]
    response = await client.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"cmd": "true"})
    assert "secret" not in error_body(response, 500, "EmberboxError")
