"""The sandbox routes: create, get, list with its filters, delete and set the timeout."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from emberbox import errors
from emberbox.api.deps import parse_metadata_filter
from emberbox.config import Settings
from emberbox.service.sandboxes.state import SandboxState
from tests.support.api_calls import create_sandbox, error_body
from tests.support.fakes_manager import FakeManager

pytestmark = pytest.mark.anyio


async def test_create_answers_201_with_the_public_view(
    client: httpx.AsyncClient, manager: FakeManager
) -> None:
    """POST /v1/sandboxes boots through the manager and answers 201 SandboxPublic."""
    body = await create_sandbox(client, image="python", metadata={"user": "ada"}, env={"A": "1"})
    assert body["state"] == "running"
    assert body["image"] == "python"
    assert body["metadata"] == {"user": "ada"}
    assert {"env", "work_dir", "vmm_pid"}.isdisjoint(body)
    assert manager.records[body["id"]].env == {"A": "1"}


async def test_get_unknown_sandbox_is_404_with_error_body(client: httpx.AsyncClient) -> None:
    """An unknown id is 404 {"error": {"type": "NotFound", "message": ...}}."""
    message = error_body(await client.get("/v1/sandboxes/sb-nope"), 404, "NotFound")
    assert "sb-nope" in message


async def test_unknown_image_is_400_listing_the_images(client: httpx.AsyncClient) -> None:
    """ImageNotFound is a 400 whose body lists the available images."""
    response = await client.post("/v1/sandboxes", json={"image": "ruby"})
    error_body(response, 400, "ImageNotFound")
    assert response.json()["error"]["available"] == ["default", "python"]
    assert response.json()["error"]["image"] == "ruby"


async def test_manager_limits_are_400_and_quota_403(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    """Errors the manager raises keep their class's status code."""
    error_body(await client.post("/v1/sandboxes", json={"vcpus": 64}), 400, "InvalidRequest")
    for _ in range(settings.max_sandboxes):
        await create_sandbox(client)
    error_body(await client.post("/v1/sandboxes", json={}), 403, "QuotaExceeded")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"vcpus": 0}, "vcpus"),
        ({"memory_mib": 10**9}, "memory_mib"),
        ({"memory_mib": 1}, "memory_mib"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"timeout_s": 10**30}, "timeout_s"),
        ({"image": "../etc"}, "image"),
        ({"metadata": {"a": 1}}, "metadata.a"),
        ({"env": {"BAD=NAME": "x"}}, "env.BAD=NAME"),
        ({"cpus": 2}, "cpus"),
    ],
)
async def test_schema_violations_are_422_naming_the_field(
    client: httpx.AsyncClient, manager: FakeManager, body: dict[str, Any], field: str
) -> None:
    """A body that breaks the schema is a 422 ValidationError naming the field."""
    message = error_body(await client.post("/v1/sandboxes", json=body), 422, "ValidationError")
    assert message.startswith(f"{field}"), message
    assert not manager.records


async def test_malformed_json_is_422(client: httpx.AsyncClient) -> None:
    """A body that is not JSON is a 422 saying so (400 when not even text), not a 500."""
    headers = {"content-type": "application/json"}
    response = await client.post("/v1/sandboxes", content=b'{"vcpus": ', headers=headers)
    assert "invalid JSON" in error_body(response, 422, "ValidationError")
    response = await client.post("/v1/sandboxes", content=b"\xff", headers=headers)
    error_body(response, 400, "InvalidRequest")
    for body in (b"[]", b"null", b""):
        response = await client.post("/v1/sandboxes", content=body, headers=headers)
        assert error_body(response, 422, "ValidationError").startswith("body: ")


async def test_delete_is_204_twice_and_404_when_unknown(
    client: httpx.AsyncClient, manager: FakeManager
) -> None:
    """DELETE is idempotent for a known sandbox and 404 for an unknown one."""
    sandbox_id = (await create_sandbox(client))["id"]
    assert (await client.delete(f"/v1/sandboxes/{sandbox_id}")).status_code == 204
    assert manager.records[sandbox_id].state is SandboxState.STOPPED
    second = await client.delete(f"/v1/sandboxes/{sandbox_id}")
    assert second.status_code == 204
    assert second.content == b""
    error_body(await client.delete("/v1/sandboxes/sb-nope"), 404, "NotFound")


async def test_list_passes_state_and_metadata_filters(
    client: httpx.AsyncClient, manager: FakeManager
) -> None:
    """?state=&metadata.KEY=VALUE reach the manager as an enum and a dict."""
    first = await create_sandbox(client, metadata={"team": "a", "env": "dev"})
    await create_sandbox(client, metadata={"team": "b"})
    params = {"state": "running", "metadata.team": "a", "metadata.env": "dev"}
    response = await client.get("/v1/sandboxes", params=params)
    assert response.status_code == 200
    assert [s["id"] for s in response.json()["sandboxes"]] == [first["id"]]
    assert manager.calls[-1] == (
        "list",
        {"state": SandboxState.RUNNING, "metadata": {"team": "a", "env": "dev"}},
    )
    everything = (await client.get("/v1/sandboxes")).json()["sandboxes"]
    assert len(everything) == 2


async def test_list_refuses_unknown_filters(client: httpx.AsyncClient) -> None:
    """Unknown query parameters and states are refused, not ignored."""
    error_body(await client.get("/v1/sandboxes?owner=x"), 400, "InvalidRequest")
    error_body(await client.get("/v1/sandboxes?metadata.=x"), 400, "InvalidRequest")
    message = error_body(await client.get("/v1/sandboxes?state=zombie"), 422, "ValidationError")
    assert message.startswith("query.state")


def test_parse_metadata_filter() -> None:
    """metadata.KEY=VALUE pairs become a dict; the allowed names are skipped."""
    params = [
        ("state", "running"),
        ("metadata.a.b", "1"),
        ("metadata.c", ""),
        ("metadata.a.b", "1"),
    ]
    assert parse_metadata_filter(params, allowed={"state"}) == {"a.b": "1", "c": ""}
    with pytest.raises(errors.InvalidRequest, match="twice"):
        parse_metadata_filter([("metadata.a", "1"), ("metadata.a", "2")], allowed=set())


async def test_set_timeout(client: httpx.AsyncClient) -> None:
    """POST .../timeout answers the sandbox with its new lifetime; 409 once stopped."""
    sandbox_id = (await create_sandbox(client))["id"]
    response = await client.post(f"/v1/sandboxes/{sandbox_id}/timeout", json={"timeout_s": 900})
    assert response.status_code == 200
    assert response.json()["timeout_s"] == 900
    error_body(
        await client.post(f"/v1/sandboxes/{sandbox_id}/timeout", json={"timeout_s": 0}),
        422,
        "ValidationError",
    )
    await client.delete(f"/v1/sandboxes/{sandbox_id}")
    response = await client.post(f"/v1/sandboxes/{sandbox_id}/timeout", json={"timeout_s": 9})
    error_body(response, 409, "Conflict")
