"""/v1/images over the real registry on a temp dir and the fake manager: list, get,
delete with usage and 409, the build route's body limit and up-front 400s, and its
NDJSON stream (the build engine replaced by a stand-in that emits events)."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from emberbox import errors
from emberbox.api import create_app
from emberbox.config import Settings
from emberbox.images.registry import FILE_NAMES, ImageConfig, ImageRegistry, register_image
from emberbox.models.images import BuildEvent
from emberbox.service.images import build as engine
from emberbox.service.images import jobs
from tests.support.fakes_manager import FakeManager

pytestmark = pytest.mark.anyio


def _register(settings: Settings, name: str, image_hash: str) -> None:
    staging = settings.cache_dir / f"stage-{image_hash}"
    staging.mkdir(parents=True)
    for file_name in FILE_NAMES.values():
        (staging / file_name).write_bytes(b"x")
    config = ImageConfig(env={"A": "1"}, workdir="/app", user="user").to_dict()
    manifest = {"image_hash": image_hash, "base": "default", "config": config}
    register_image(settings, name, staging, manifest, tenant=None)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    made = Settings(
        data_dir=tmp_path / "data",
        cache_dir=tmp_path / "cache",
        build_context_max_bytes=64 << 10,
        image_gc_grace_s=0,
        image_template_after_build=False,
    )
    _register(made, "default", "h-default")
    _register(made, "app", "h-app")
    return made


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    registry = ImageRegistry(settings)
    manager = FakeManager(settings, registry)  # type: ignore[arg-type]
    app = create_app(settings, manager, registry=registry)  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
        yield c


def context_tar(files: dict[str, str]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


async def test_list_get_and_delete_with_usage(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    listed = (await client.get("/v1/images")).json()
    assert [(i["name"], i["default"], i["shared"]) for i in listed] == [
        ("app", False, True),
        ("default", True, True),
    ]
    app = (await client.get("/v1/images/app")).json()
    assert (app["env"], app["workdir"], app["user"], app["base"]) == (
        {"A": "1"},
        "/app",
        "user",
        "default",
    )
    assert (await client.get("/v1/images/nope")).status_code == 404
    assert (await client.get("/v1/images/-bad")).status_code == 422
    sandbox = (await client.post("/v1/sandboxes", json={"image": "app"})).json()
    assert (await client.get("/v1/images/app")).json()["usage"]["sandboxes"] == [sandbox["id"]]
    refused = await client.delete("/v1/images/app")
    assert refused.status_code == 409 and sandbox["id"] in refused.json()["error"]["message"]
    assert (await client.delete("/v1/images/default")).status_code == 409
    await client.delete(f"/v1/sandboxes/{sandbox['id']}")
    deleted = await client.delete("/v1/images/app")
    assert deleted.status_code == 200 and deleted.json()["freed_bytes"] > 0
    assert not (settings.images_dir / "blobs" / "h-app").exists()
    assert (settings.images_dir / "blobs" / "h-default").is_dir()
    entries = (await client.get("/v1/audit")).json()["entries"]
    deletes = [(e["target_id"], e["outcome"]) for e in entries if e["action"] == "image.delete"]
    assert sorted(deletes) == [("app", "Conflict"), ("app", "ok"), ("default", "Conflict")]


async def test_build_refusals_come_before_the_stream(client: httpx.AsyncClient) -> None:
    big = await client.post("/v1/images?name=x", content=b"\0" * (65 << 10))
    assert big.status_code == 413
    no_file = await client.post("/v1/images?name=x", content=context_tar({"a": "b"}))
    assert no_file.status_code == 400 and "no Dockerfile" in no_file.text
    bad = await client.post(
        "/v1/images?name=x", content=context_tar({"Dockerfile": "FROM default\nHEALTHCHECK x\n"})
    )
    assert bad.status_code == 400 and "line 2" in bad.text, bad.text
    outside = await client.post(
        "/v1/images?name=x&dockerfile=../Dockerfile", content=context_tar({"a": "b"})
    )
    assert outside.status_code == 400
    bad_name = await client.post("/v1/images?name=a/b", content=context_tar({"a": "b"}))
    assert bad_name.status_code in (400, 422)
    bad_arg = await client.post("/v1/images?name=x&build_arg=NOEQUALS", content=b"")
    assert bad_arg.status_code == 400


async def test_build_streams_events_then_the_error(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, Any] = {}

    async def fake_build(deps: Any, request: engine.BuildRequest, on_event: Any) -> Any:
        seen["request"] = request
        seen["context_exists"] = _is_file(request.context)
        await on_event(BuildEvent("step", step=1, total=2, instruction="RUN x", state="running"))
        await on_event(BuildEvent("log", step=1, log="hello\n"))
        await on_event(BuildEvent("error", step=1, exit_code=3, log="hello\n", message="failed"))
        raise errors.ImageBuildError("failed", step=1, exit_code=3)

    monkeypatch.setattr(engine, "build_image", fake_build)
    body = context_tar({"Dockerfile": "FROM default\nARG V\nRUN x\n"})
    answer = await client.post("/v1/images?name=new&build_arg=V=1&no_cache=true", content=body)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("application/x-ndjson")
    events = [json.loads(line) for line in answer.text.splitlines()]
    assert [e["kind"] for e in events] == ["step", "log", "error"]  # one error event
    assert (events[-1]["exit_code"], events[-1]["error"]) == (3, "ImageBuildError")
    request = seen["request"]
    assert (request.name, request.tenant, dict(request.build_args), request.no_cache) == (
        "new",
        None,
        {"V": "1"},
        True,
    )
    assert "RUN x" in request.dockerfile and seen["context_exists"]
    assert not _is_file(request.context)  # the upload is gone afterwards


def _is_file(path: Path | None) -> bool:
    return path is not None and path.is_file()


async def test_a_build_ends_with_done_after_everything_else(
    client: httpx.AsyncClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def fake_build(deps: Any, request: engine.BuildRequest, on_event: Any) -> Any:
        await on_event(BuildEvent("step", step=1, total=1, instruction="RUN x", state="done"))
        await on_event(BuildEvent("done", image=request.name, total=1))
        return ImageRegistry(settings).get("app")

    async def after(self: Any, info: Any, on_event: Any) -> None:
        await on_event(BuildEvent("progress", message="making the template"))

    monkeypatch.setattr(engine, "build_image", fake_build)
    monkeypatch.setattr(jobs.ImageJobs, "after_register", after)
    body = context_tar({"Dockerfile": "FROM default\nRUN x\n"})
    answer = await client.post("/v1/images?name=app", content=body)
    kinds = [json.loads(line)["kind"] for line in answer.text.splitlines()]
    assert kinds == ["step", "progress", "done"]
