"""The HTTP layer over a fake in-memory manager: status codes, bodies, OpenAPI."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from emberbox import errors
from emberbox.agent_client.client import ExecResult
from emberbox.api import create_app
from emberbox.api.deps import parse_metadata_filter
from emberbox.api.errors import format_validation_errors
from emberbox.config import Settings
from emberbox.service.sandboxes.state import SandboxState
from tests.support.fakes_manager import FakeManager, FakeRegistry

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """Run async tests on asyncio only."""
    return "asyncio"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings whose directories all live in the test's temp dir."""
    return Settings(data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")


@pytest.fixture
def registry(tmp_path: Path) -> FakeRegistry:
    """Two fake images, `default` and `python`, with real (tiny) files."""
    return FakeRegistry(tmp_path / "images")


@pytest.fixture
def manager(settings: Settings, registry: FakeRegistry) -> FakeManager:
    """An in-memory manager."""
    return FakeManager(settings, registry)


@pytest.fixture
def app(settings: Settings, manager: FakeManager, registry: FakeRegistry) -> FastAPI:
    """The real app over the fakes."""
    return create_app(settings, manager, registry=registry)  # type: ignore[arg-type]


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client talking to the app in-process."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://emberbox") as c:
        yield c


async def _create(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await client.post("/v1/sandboxes", json=body)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


def _error(response: httpx.Response, status: int, type_name: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["type"] == type_name
    message: str = body["error"]["message"]
    assert message
    return message


# --- sandboxes ---------------------------------------------------------------------------


async def test_create_answers_201_with_the_public_view(
    client: httpx.AsyncClient, manager: FakeManager
) -> None:
    """POST /v1/sandboxes boots through the manager and answers 201 SandboxPublic."""
    body = await _create(client, image="python", metadata={"user": "ada"}, env={"A": "1"})
    assert body["state"] == "running"
    assert body["image"] == "python"
    assert body["metadata"] == {"user": "ada"}
    assert {"env", "work_dir", "vmm_pid"}.isdisjoint(body)
    assert manager.records[body["id"]].env == {"A": "1"}


async def test_get_unknown_sandbox_is_404_with_error_body(client: httpx.AsyncClient) -> None:
    """An unknown id is 404 {"error": {"type": "NotFound", "message": ...}}."""
    message = _error(await client.get("/v1/sandboxes/sb-nope"), 404, "NotFound")
    assert "sb-nope" in message


async def test_unknown_image_is_400_listing_the_images(client: httpx.AsyncClient) -> None:
    """ImageNotFound is a 400 whose body lists the available images."""
    response = await client.post("/v1/sandboxes", json={"image": "ruby"})
    _error(response, 400, "ImageNotFound")
    assert response.json()["error"]["available"] == ["default", "python"]
    assert response.json()["error"]["image"] == "ruby"


async def test_manager_limits_are_400_and_quota_403(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    """Errors the manager raises keep their class's status code."""
    _error(await client.post("/v1/sandboxes", json={"vcpus": 64}), 400, "InvalidRequest")
    for _ in range(settings.max_sandboxes):
        await _create(client)
    _error(await client.post("/v1/sandboxes", json={}), 403, "QuotaExceeded")


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
    message = _error(await client.post("/v1/sandboxes", json=body), 422, "ValidationError")
    assert message.startswith(f"{field}"), message
    assert not manager.records


async def test_malformed_json_is_422(client: httpx.AsyncClient) -> None:
    """A body that is not JSON is a 422 saying so (400 when not even text), not a 500."""
    headers = {"content-type": "application/json"}
    response = await client.post("/v1/sandboxes", content=b'{"vcpus": ', headers=headers)
    assert "invalid JSON" in _error(response, 422, "ValidationError")
    response = await client.post("/v1/sandboxes", content=b"\xff", headers=headers)
    _error(response, 400, "InvalidRequest")
    for body in (b"[]", b"null", b""):
        response = await client.post("/v1/sandboxes", content=body, headers=headers)
        assert _error(response, 422, "ValidationError").startswith("body: ")


async def test_delete_is_204_twice_and_404_when_unknown(
    client: httpx.AsyncClient, manager: FakeManager
) -> None:
    """DELETE is idempotent for a known sandbox and 404 for an unknown one."""
    sandbox_id = (await _create(client))["id"]
    assert (await client.delete(f"/v1/sandboxes/{sandbox_id}")).status_code == 204
    assert manager.records[sandbox_id].state is SandboxState.STOPPED
    second = await client.delete(f"/v1/sandboxes/{sandbox_id}")
    assert second.status_code == 204
    assert second.content == b""
    _error(await client.delete("/v1/sandboxes/sb-nope"), 404, "NotFound")


async def test_list_passes_state_and_metadata_filters(
    client: httpx.AsyncClient, manager: FakeManager
) -> None:
    """?state=&metadata.KEY=VALUE reach the manager as an enum and a dict."""
    first = await _create(client, metadata={"team": "a", "env": "dev"})
    await _create(client, metadata={"team": "b"})
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
    _error(await client.get("/v1/sandboxes?owner=x"), 400, "InvalidRequest")
    _error(await client.get("/v1/sandboxes?metadata.=x"), 400, "InvalidRequest")
    message = _error(await client.get("/v1/sandboxes?state=zombie"), 422, "ValidationError")
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
    sandbox_id = (await _create(client))["id"]
    response = await client.post(f"/v1/sandboxes/{sandbox_id}/timeout", json={"timeout_s": 900})
    assert response.status_code == 200
    assert response.json()["timeout_s"] == 900
    _error(
        await client.post(f"/v1/sandboxes/{sandbox_id}/timeout", json={"timeout_s": 0}),
        422,
        "ValidationError",
    )
    await client.delete(f"/v1/sandboxes/{sandbox_id}")
    response = await client.post(f"/v1/sandboxes/{sandbox_id}/timeout", json={"timeout_s": 9})
    _error(response, 409, "Conflict")


# --- exec --------------------------------------------------------------------------------


async def test_exec_returns_decoded_output(client: httpx.AsyncClient, manager: FakeManager) -> None:
    """Exec sends stdin as bytes and answers text, invalid UTF-8 replaced."""
    sandbox_id = (await _create(client))["id"]
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
    sandbox_id = (await _create(client))["id"]
    await client.delete(f"/v1/sandboxes/{sandbox_id}")
    response = await client.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"cmd": "true"})
    _error(response, 409, "Conflict")


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
    sandbox_id = (await _create(client))["id"]
    response = await client.post(
        f"/v1/sandboxes/{sandbox_id}/exec",
        content=raw,
        headers={"content-type": "application/json"},
    )
    assert field in _error(response, 422, "ValidationError")


async def test_exec_timeout_with_partial_result_answers_timed_out(
    client: httpx.AsyncClient, manager: FakeManager
) -> None:
    """ExecTimeout carrying a result is a 200 with timed_out; without one it is a 504."""
    sandbox_id = (await _create(client))["id"]
    partial = ExecResult(-9, b"partial", b"", duration_ms=1000.0, signal=9)
    manager.raise_on_exec = errors.ExecTimeout("ran past 1 s", result=partial)
    response = await client.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"cmd": "sleep 9"})
    assert response.status_code == 200
    assert response.json()["timed_out"] is True
    assert response.json()["stdout"] == "partial"
    manager.raise_on_exec = errors.ExecTimeout("ran past 1 s")
    response = await client.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"cmd": "sleep 9"})
    _error(response, 504, "ExecTimeout")


async def test_vmm_error_body_carries_the_console_tail(
    client: httpx.AsyncClient, manager: FakeManager
) -> None:
    """A VMMError is a 502 whose message is the message and whose console tail is a field."""
    sandbox_id = (await _create(client))["id"]
    manager.raise_on_exec = errors.VMMCrashed("qemu died", console_tail="Kernel panic")
    response = await client.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"cmd": "true"})
    assert _error(response, 502, "VMMCrashed") == "qemu died"
    assert response.json()["error"]["console_tail"] == "Kernel panic"


async def test_unexpected_exception_is_a_500_with_the_same_body(
    client: httpx.AsyncClient, manager: FakeManager
) -> None:
    """A bug (any other exception) is a 500 with the usual body and no details leaked."""
    sandbox_id = (await _create(client))["id"]
    manager.raise_on_exec = RuntimeError("secret internals")  # type: ignore[assignment]
    response = await client.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"cmd": "true"})
    assert "secret" not in _error(response, 500, "EmberboxError")


# --- seed --------------------------------------------------------------------------------


async def test_seed_create_and_command(client: httpx.AsyncClient, manager: FakeManager) -> None:
    """The seed's two requests work as its blog post shows, plus exit_code."""
    body = {"name": "basic_demo", "user_id": "c598"}
    response = await client.post("/vm/create", json=body)
    assert response.status_code == 200
    created = response.json()
    assert set(created) == {"ip_address", "vm_id"}
    assert manager.records[created["vm_id"]].metadata == {"name": "basic_demo", "user_id": "c598"}
    command = {"vm_id": created["vm_id"], "command": "echo Hello World"}
    response = await client.post("/exec/command", json=command)
    assert response.json() == {
        "success": True,
        "output": f"ran echo Hello World in {created['vm_id']}\nerr\ufffd\n",
        "exit_code": 0,
    }
    command["command"] = "fail"
    assert (await client.post("/exec/command", json=command)).json()["success"] is False
    _error(
        await client.post("/exec/command", json={"vm_id": "x", "command": "ls"}), 404, "NotFound"
    )


async def test_seed_accepts_the_files_of_a_registered_image(
    client: httpx.AsyncClient, manager: FakeManager, registry: FakeRegistry
) -> None:
    """Paths resolving to one registered image's rootfs and kernel pick that image."""
    files = registry.get("python").files
    dotted = str(files.rootfs.parent / ".." / "python" / files.rootfs.name)
    for kernel in (files.kernel, files.vmlinux):
        body = {"name": "n", "user_id": "u", "root_image_path": dotted, "kernel_path": str(kernel)}
        response = await client.post("/vm/create", json=body)
        assert response.status_code == 200, response.text
        assert manager.records[response.json()["vm_id"]].image == "python"
    only_kernel = {"name": "n", "user_id": "u", "kernel_path": str(files.kernel)}
    assert (await client.post("/vm/create", json=only_kernel)).status_code == 200
    assert manager.calls[-1] == (
        "create",
        {"image": "python", "metadata": {"name": "n", "user_id": "u"}},
    )


@pytest.mark.parametrize(
    "paths",
    [
        {"root_image_path": "/etc/passwd"},
        {"kernel_path": "/etc/passwd"},
        {"root_image_path": "relative/rootfs.ext4"},
        {"root_image_path": "OUTSIDE"},
        {"root_image_path": "python:kernel"},
        {"kernel_path": "python:rootfs"},
        {"root_image_path": "python:rootfs", "kernel_path": "default:kernel"},
    ],
)
async def test_seed_refuses_any_other_host_path(
    client: httpx.AsyncClient,
    manager: FakeManager,
    registry: FakeRegistry,
    tmp_path: Path,
    paths: dict[str, str],
) -> None:
    """A path that is not the right file of one registered image is a 400; nothing boots."""
    outside = tmp_path / "rootfs.ext4"
    outside.write_bytes(b"x")

    def real(value: str) -> str:
        if value == "OUTSIDE":
            return str(outside)
        if ":" in value:
            name, kind = value.split(":")
            return str(getattr(registry.get(name).files, kind))
        return value

    body = {"name": "n", "user_id": "u", **{k: real(v) for k, v in paths.items()}}
    message = _error(await client.post("/vm/create", json=body), 400, "InvalidRequest")
    assert "registered image" in message or "different images" in message
    assert not manager.records


async def test_seed_path_with_nul_is_422(client: httpx.AsyncClient) -> None:
    """A path with a NUL byte never reaches path resolution."""
    body = {"name": "n", "user_id": "u", "root_image_path": "/a\u0000b"}
    assert "root_image_path" in _error(
        await client.post("/vm/create", json=body), 422, "ValidationError"
    )


# --- system ------------------------------------------------------------------------------


async def test_healthz_and_images(client: httpx.AsyncClient) -> None:
    """/healthz counts live sandboxes; /v1/images lists the registry, marking the default."""
    assert (await client.get("/healthz")).json() == {
        "status": "ok",
        "version": "0.1.0",
        "sandboxes": 0,
    }
    sandbox_id = (await _create(client))["id"]
    await _create(client)
    await client.delete(f"/v1/sandboxes/{sandbox_id}")
    assert (await client.get("/healthz")).json()["sandboxes"] == 1
    images = (await client.get("/v1/images")).json()
    assert [(i["name"], i["default"], i["kernel_release"]) for i in images] == [
        ("default", True, "6.6.1"),
        ("python", False, "6.6.1"),
    ]


async def test_unknown_route_and_method_use_the_error_body(client: httpx.AsyncClient) -> None:
    """Routing errors have the same body shape as every other error."""
    _error(await client.get("/v2/nothing"), 404, "NotFound")
    _error(await client.put("/v1/sandboxes"), 405, "MethodNotAllowed")


async def test_openapi_documents_models_and_errors(client: httpx.AsyncClient) -> None:
    """Every route declares its success model and its error responses as ErrorBody."""
    spec = (await client.get("/openapi.json")).json()
    assert (await client.get("/docs")).status_code == 200
    error_ref = "#/components/schemas/ErrorBody"
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            success = [code for code in responses if code.startswith("2")]
            assert len(success) == 1, (method, path)
            content = str(responses.get(success[0], {}).get("content"))
            if success[0] != "204" and "'format': 'binary'" not in content:
                assert "$ref" in content, (method, path)
            for code, response in responses.items():
                if code[0] in "45":
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": error_ref}, (method, path, code)
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    assert "404" in spec["paths"]["/v1/sandboxes/{sandbox_id}"]["get"]["responses"]


def test_format_validation_errors() -> None:
    """Locations become dotted field paths without the body prefix."""
    items = [
        {"loc": ("body", "env", "A"), "msg": "bad", "type": "x"},
        {"loc": ("query", "state"), "msg": "worse", "type": "y"},
        {
            "loc": ("body", 3),
            "msg": "JSON decode error",
            "type": "json_invalid",
            "ctx": {"error": "Expecting value"},
        },
    ]
    assert format_validation_errors(items) == (
        "env.A: bad; query.state: worse; body: invalid JSON (Expecting value)"
    )


# --- authentication ----------------------------------------------------------------------


async def test_api_key_is_required_when_configured(tmp_path: Path, registry: FakeRegistry) -> None:
    """With Settings.api_key set, /v1 and seed routes need the Bearer key; /healthz does not."""
    settings = Settings(data_dir=tmp_path / "data", api_key="s3cret")
    app = create_app(settings, FakeManager(settings, registry), registry=registry)  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://e") as client:
        _error(await client.get("/v1/sandboxes"), 401, "Unauthorized")
        wrong = {"Authorization": "Bearer nope"}
        _error(await client.get("/v1/sandboxes", headers=wrong), 401, "Unauthorized")
        _error(await client.post("/exec/command", json={}), 401, "Unauthorized")
        right = {"Authorization": "Bearer s3cret"}
        assert (await client.get("/v1/sandboxes", headers=right)).status_code == 200
        _error(await client.get("/v1/images"), 401, "Unauthorized")
        assert (await client.get("/v1/images", headers=right)).status_code == 200
        assert (await client.get("/healthz")).status_code == 200


# --- pause, resume and snapshots ---------------------------------------------------------

SNAPSHOT_FIELDS = {"id", "sandbox_id", "image", "vcpus", "memory_mib", "size_bytes", "created_at"}


async def _snapshot(client: httpx.AsyncClient, sandbox_id: str) -> dict[str, Any]:
    response = await client.post(f"/v1/sandboxes/{sandbox_id}/snapshots")
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


async def test_pause_and_resume_move_the_state(client: httpx.AsyncClient) -> None:
    """pause answers `paused`, resume `running`; each is a 409 from the wrong state."""
    sandbox_id = (await _create(client))["id"]
    paused = await client.post(f"/v1/sandboxes/{sandbox_id}/pause")
    assert (paused.status_code, paused.json()["state"]) == (200, "paused")
    assert (await client.get(f"/v1/sandboxes/{sandbox_id}")).json()["state"] == "paused"
    listed = (await client.get("/v1/sandboxes?state=paused")).json()["sandboxes"]
    assert [s["id"] for s in listed] == [sandbox_id]
    _error(await client.post(f"/v1/sandboxes/{sandbox_id}/pause"), 409, "Conflict")
    response = await client.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"cmd": "true"})
    _error(response, 409, "Conflict")
    resumed = await client.post(f"/v1/sandboxes/{sandbox_id}/resume")
    assert (resumed.status_code, resumed.json()["state"]) == (200, "running")
    _error(await client.post(f"/v1/sandboxes/{sandbox_id}/resume"), 409, "Conflict")
    _error(await client.post("/v1/sandboxes/sb-nope/pause"), 404, "NotFound")
    _error(await client.post("/v1/sandboxes/sb-nope/resume"), 404, "NotFound")


async def test_snapshot_is_201_without_host_details(client: httpx.AsyncClient) -> None:
    """POST .../snapshots answers SnapshotPublic: no host path, no VMM; 409 unless running."""
    sandbox = await _create(client, image="python", vcpus=2)
    response = await client.post(f"/v1/sandboxes/{sandbox['id']}/snapshots")
    assert response.status_code == 201
    body = response.json()
    assert set(body) == SNAPSHOT_FIELDS
    assert (body["sandbox_id"], body["image"], body["vcpus"]) == (sandbox["id"], "python", 2)
    assert "nonexistent" not in response.text
    assert "qemu" not in response.text
    await client.post(f"/v1/sandboxes/{sandbox['id']}/pause")
    _error(await client.post(f"/v1/sandboxes/{sandbox['id']}/snapshots"), 409, "Conflict")
    _error(await client.post("/v1/sandboxes/sb-nope/snapshots"), 404, "NotFound")


async def test_fork_from_a_snapshot(client: httpx.AsyncClient, manager: FakeManager) -> None:
    """snapshot_id forks with the snapshot's shape; another shape is 409 SnapshotMismatch."""
    parent = await _create(client, image="python", vcpus=2, memory_mib=256)
    snapshot_id = (await _snapshot(client, parent["id"]))["id"]
    fork = await _create(client, snapshot_id=snapshot_id, metadata={"fork": "1"})
    assert fork["snapshot_id"] == snapshot_id
    assert (fork["image"], fork["vcpus"], fork["memory_mib"]) == ("python", 2, 256)
    assert parent["snapshot_id"] is None
    same = await _create(client, snapshot_id=snapshot_id, image="python", vcpus=2)
    assert same["snapshot_id"] == snapshot_id
    for other in ({"image": "default"}, {"vcpus": 1}, {"memory_mib": 512}):
        response = await client.post("/v1/sandboxes", json={"snapshot_id": snapshot_id, **other})
        assert next(iter(other)) in _error(response, 409, "SnapshotMismatch")
    response = await client.post("/v1/sandboxes", json={"snapshot_id": "snap-nope"})
    _error(response, 404, "NotFound")
    for bad in ("", "../x", "a/b", "x" * 129, 5):
        response = await client.post("/v1/sandboxes", json={"snapshot_id": bad})
        assert _error(response, 422, "ValidationError").startswith("snapshot_id")
    assert len(manager.records) == 3


async def test_list_get_and_delete_snapshots(
    client: httpx.AsyncClient, manager: FakeManager
) -> None:
    """List (oldest first, by sandbox), get and delete; 409 while a fork lives, then 404."""
    first, second = (await _create(client))["id"], (await _create(client))["id"]
    a = await _snapshot(client, first)
    b = await _snapshot(client, second)
    c = await _snapshot(client, first)
    everything = (await client.get("/v1/snapshots")).json()["snapshots"]
    assert [s["id"] for s in everything] == [a["id"], b["id"], c["id"]]
    assert all(set(s) == SNAPSHOT_FIELDS for s in everything)
    mine = await client.get("/v1/snapshots", params={"sandbox_id": first})
    assert [s["id"] for s in mine.json()["snapshots"]] == [a["id"], c["id"]]
    assert manager.calls[-1] == ("list_snapshots", {"sandbox_id": first})
    _error(await client.get("/v1/snapshots?sandbox=x"), 400, "InvalidRequest")
    _error(await client.get("/v1/snapshots?sandbox_id=../x"), 422, "ValidationError")
    assert (await client.get(f"/v1/snapshots/{b['id']}")).json() == b
    fork = await _create(client, snapshot_id=a["id"])
    message = _error(await client.delete(f"/v1/snapshots/{a['id']}"), 409, "Conflict")
    assert fork["id"] in message
    await client.delete(f"/v1/sandboxes/{fork['id']}")
    response = await client.delete(f"/v1/snapshots/{a['id']}")
    assert (response.status_code, response.content) == (204, b"")
    _error(await client.get(f"/v1/snapshots/{a['id']}"), 404, "NotFound")
    _error(await client.delete(f"/v1/snapshots/{a['id']}"), 404, "NotFound")
    assert a["id"] not in str((await client.get("/v1/snapshots")).json())


async def test_snapshot_corrupt_is_a_502_with_its_console_tail(
    client: httpx.AsyncClient, manager: FakeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SnapshotCorrupt keeps VMMError's status (502) and carries the console tail."""

    async def corrupt(snapshot_id: str) -> None:
        raise errors.SnapshotCorrupt("snapshot memory file is truncated", console_tail="tail")

    sandbox_id = (await _create(client))["id"]
    snapshot_id = (await _snapshot(client, sandbox_id))["id"]
    monkeypatch.setattr(manager, "delete_snapshot", corrupt)
    response = await client.delete(f"/v1/snapshots/{snapshot_id}")
    assert _error(response, 502, "SnapshotCorrupt") == "snapshot memory file is truncated"
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
