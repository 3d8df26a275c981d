"""Pause, resume and snapshots over HTTP: states, forks, listing and deletion."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from emberbox import errors
from tests.support.api_calls import create_sandbox, error_body
from tests.support.fakes_manager import FakeManager

pytestmark = pytest.mark.anyio

SNAPSHOT_FIELDS = {"id", "sandbox_id", "image", "vcpus", "memory_mib", "size_bytes", "created_at"}


async def _snapshot(client: httpx.AsyncClient, sandbox_id: str) -> dict[str, Any]:
    response = await client.post(f"/v1/sandboxes/{sandbox_id}/snapshots")
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


async def test_pause_and_resume_move_the_state(client: httpx.AsyncClient) -> None:
    """pause answers `paused`, resume `running`; each is a 409 from the wrong state."""
    sandbox_id = (await create_sandbox(client))["id"]
    paused = await client.post(f"/v1/sandboxes/{sandbox_id}/pause")
    assert (paused.status_code, paused.json()["state"]) == (200, "paused")
    assert (await client.get(f"/v1/sandboxes/{sandbox_id}")).json()["state"] == "paused"
    listed = (await client.get("/v1/sandboxes?state=paused")).json()["sandboxes"]
    assert [s["id"] for s in listed] == [sandbox_id]
    error_body(await client.post(f"/v1/sandboxes/{sandbox_id}/pause"), 409, "Conflict")
    response = await client.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"cmd": "true"})
    error_body(response, 409, "Conflict")
    resumed = await client.post(f"/v1/sandboxes/{sandbox_id}/resume")
    assert (resumed.status_code, resumed.json()["state"]) == (200, "running")
    error_body(await client.post(f"/v1/sandboxes/{sandbox_id}/resume"), 409, "Conflict")
    error_body(await client.post("/v1/sandboxes/sb-nope/pause"), 404, "NotFound")
    error_body(await client.post("/v1/sandboxes/sb-nope/resume"), 404, "NotFound")


async def test_snapshot_is_201_without_host_details(client: httpx.AsyncClient) -> None:
    """POST .../snapshots answers SnapshotPublic: no host path, no VMM; 409 unless running."""
    sandbox = await create_sandbox(client, image="python", vcpus=2)
    response = await client.post(f"/v1/sandboxes/{sandbox['id']}/snapshots")
    assert response.status_code == 201
    body = response.json()
    assert set(body) == SNAPSHOT_FIELDS
    assert (body["sandbox_id"], body["image"], body["vcpus"]) == (sandbox["id"], "python", 2)
    assert "nonexistent" not in response.text
    assert "qemu" not in response.text
    await client.post(f"/v1/sandboxes/{sandbox['id']}/pause")
    error_body(await client.post(f"/v1/sandboxes/{sandbox['id']}/snapshots"), 409, "Conflict")
    error_body(await client.post("/v1/sandboxes/sb-nope/snapshots"), 404, "NotFound")


async def test_fork_from_a_snapshot(client: httpx.AsyncClient, manager: FakeManager) -> None:
    """snapshot_id forks with the snapshot's shape; another shape is 409 SnapshotMismatch."""
    parent = await create_sandbox(client, image="python", vcpus=2, memory_mib=256)
    snapshot_id = (await _snapshot(client, parent["id"]))["id"]
    fork = await create_sandbox(client, snapshot_id=snapshot_id, metadata={"fork": "1"})
    assert fork["snapshot_id"] == snapshot_id
    assert (fork["image"], fork["vcpus"], fork["memory_mib"]) == ("python", 2, 256)
    assert parent["snapshot_id"] is None
    same = await create_sandbox(client, snapshot_id=snapshot_id, image="python", vcpus=2)
    assert same["snapshot_id"] == snapshot_id
    for other in ({"image": "default"}, {"vcpus": 1}, {"memory_mib": 512}):
        response = await client.post("/v1/sandboxes", json={"snapshot_id": snapshot_id, **other})
        assert next(iter(other)) in error_body(response, 409, "SnapshotMismatch")
    response = await client.post("/v1/sandboxes", json={"snapshot_id": "snap-nope"})
    error_body(response, 404, "NotFound")
    for bad in ("", "../x", "a/b", "x" * 129, 5):
        response = await client.post("/v1/sandboxes", json={"snapshot_id": bad})
        assert error_body(response, 422, "ValidationError").startswith("snapshot_id")
    assert len(manager.records) == 3


async def test_list_get_and_delete_snapshots(
    client: httpx.AsyncClient, manager: FakeManager
) -> None:
    """List (oldest first, by sandbox), get and delete; 409 while a fork lives, then 404."""
    first, second = (await create_sandbox(client))["id"], (await create_sandbox(client))["id"]
    a = await _snapshot(client, first)
    b = await _snapshot(client, second)
    c = await _snapshot(client, first)
    everything = (await client.get("/v1/snapshots")).json()["snapshots"]
    assert [s["id"] for s in everything] == [a["id"], b["id"], c["id"]]
    assert all(set(s) == SNAPSHOT_FIELDS for s in everything)
    mine = await client.get("/v1/snapshots", params={"sandbox_id": first})
    assert [s["id"] for s in mine.json()["snapshots"]] == [a["id"], c["id"]]
    assert manager.calls[-1] == ("list_snapshots", {"sandbox_id": first})
    error_body(await client.get("/v1/snapshots?sandbox=x"), 400, "InvalidRequest")
    error_body(await client.get("/v1/snapshots?sandbox_id=../x"), 422, "ValidationError")
    assert (await client.get(f"/v1/snapshots/{b['id']}")).json() == b
    fork = await create_sandbox(client, snapshot_id=a["id"])
    message = error_body(await client.delete(f"/v1/snapshots/{a['id']}"), 409, "Conflict")
    assert fork["id"] in message
    await client.delete(f"/v1/sandboxes/{fork['id']}")
    response = await client.delete(f"/v1/snapshots/{a['id']}")
    assert (response.status_code, response.content) == (204, b"")
    error_body(await client.get(f"/v1/snapshots/{a['id']}"), 404, "NotFound")
    error_body(await client.delete(f"/v1/snapshots/{a['id']}"), 404, "NotFound")
    assert a["id"] not in str((await client.get("/v1/snapshots")).json())


async def test_snapshot_corrupt_is_a_502_with_its_console_tail(
    client: httpx.AsyncClient, manager: FakeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SnapshotCorrupt keeps VMMError's status (502) and carries the console tail."""

    async def corrupt(snapshot_id: str) -> None:
        raise errors.SnapshotCorrupt("snapshot memory file is truncated", console_tail="tail")

    sandbox_id = (await create_sandbox(client))["id"]
    snapshot_id = (await _snapshot(client, sandbox_id))["id"]
    monkeypatch.setattr(manager, "delete_snapshot", corrupt)
    response = await client.delete(f"/v1/snapshots/{snapshot_id}")
    assert error_body(response, 502, "SnapshotCorrupt") == "snapshot memory file is truncated"
    assert response.json()["error"]["console_tail"] == "tail"


async def test_openapi_lists_the_snapshot_routes(client: httpx.AsyncClient) -> None:
    """The new paths are documented; SnapshotPublic has no host path or VMM field."""
    spec = (await client.get("/openapi.json")).json()
    paths = spec["paths"]
    assert set(paths["/v1/sandboxes/{sandbox_id}/snapshots"]) == {"post"}
    assert set(paths["/v1/sandboxes/{sandbox_id}/pause"]) == {"post"}
    assert set(paths["/v1/sandboxes/{sandbox_id}/resume"]) == {"post"}
    assert set(paths["/v1/snapshots"]) == {"get"}
    assert set(paths["/v1/snapshots/{snapshot_id}"]) == {"get", "delete"}
    assert "409" in paths["/v1/snapshots/{snapshot_id}"]["delete"]["responses"]
    assert "201" in paths["/v1/sandboxes/{sandbox_id}/snapshots"]["post"]["responses"]
    schemas = spec["components"]["schemas"]
    assert set(schemas["SnapshotPublic"]["properties"]) == SNAPSHOT_FIELDS
    assert "snapshot_id" in schemas["SandboxCreate"]["properties"]
    assert "paused" in schemas["SandboxPublic"]["properties"]["state"]["enum"]
