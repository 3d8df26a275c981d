"""/healthz, /v1/images, routing errors, the OpenAPI document and the API key."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from emberbox.api import create_app
from emberbox.api.errors import format_validation_errors
from emberbox.config import Settings
from tests.support.api_calls import create_sandbox, error_body
from tests.support.fakes_manager import FakeManager, FakeRegistry

pytestmark = pytest.mark.anyio


async def test_healthz_and_images(client: httpx.AsyncClient) -> None:
    """/healthz counts live sandboxes; /v1/images lists the registry, marking the default."""
    assert (await client.get("/healthz")).json() == {
        "status": "ok",
        "version": "0.1.0",
        "sandboxes": 0,
    }
    sandbox_id = (await create_sandbox(client))["id"]
    await create_sandbox(client)
    await client.delete(f"/v1/sandboxes/{sandbox_id}")
    assert (await client.get("/healthz")).json()["sandboxes"] == 1
    images = (await client.get("/v1/images")).json()
    assert [(i["name"], i["default"], i["kernel_release"]) for i in images] == [
        ("default", True, "6.6.1"),
        ("python", False, "6.6.1"),
    ]


async def test_unknown_route_and_method_use_the_error_body(client: httpx.AsyncClient) -> None:
    """Routing errors have the same body shape as every other error."""
    error_body(await client.get("/v2/nothing"), 404, "NotFound")
    error_body(await client.put("/v1/sandboxes"), 405, "MethodNotAllowed")


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
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        error_body(await client.get("/v1/sandboxes"), 401, "Unauthorized")
        wrong = {"Authorization": "Bearer nope"}
        error_body(await client.get("/v1/sandboxes", headers=wrong), 401, "Unauthorized")
        error_body(await client.post("/exec/command", json={}), 401, "Unauthorized")
        right = {"Authorization": "Bearer s3cret"}
        assert (await client.get("/v1/sandboxes", headers=right)).status_code == 200
        error_body(await client.get("/v1/images"), 401, "Unauthorized")
        assert (await client.get("/v1/images", headers=right)).status_code == 200
        assert (await client.get("/healthz")).status_code == 200
