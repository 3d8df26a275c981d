"""The seed's routes (/vm/create and /exec/command) and the host paths they accept."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.support.api_calls import error_body
from tests.support.fakes_manager import FakeManager, FakeRegistry

pytestmark = pytest.mark.anyio


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
    error_body(
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
    message = error_body(await client.post("/vm/create", json=body), 400, "InvalidRequest")
    assert "registered image" in message or "different images" in message
    assert not manager.records


async def test_seed_path_with_nul_is_422(client: httpx.AsyncClient) -> None:
    """A path with a NUL byte never reaches path resolution."""
    body = {"name": "n", "user_id": "u", "root_image_path": "/a\u0000b"}
    assert "root_image_path" in error_body(
        await client.post("/vm/create", json=body), 422, "ValidationError"
    )
