"""The image registry against a real ``emberbox serve`` with real VMs: list/get/delete
with usage, 409 while used, blob collection, tenant isolation, the image quota, and a
sandbox of a registered custom image that sees its ENV, WORKDIR and USER (the first
create makes the image's template, the next restores it).

The custom images are registered without a build: the default image's files hard-linked
under a new content hash with an ImageConfig (register_image, as a build ends). The
server gets a private images directory, so its garbage collection sees only this
module's blobs.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from emberbox import errors
from emberbox.config import Settings
from emberbox.images.registry import (
    FILE_NAMES,
    ImageConfig,
    ImageInfo,
    register_image,
)
from emberbox.service.images.registry_service import held_paths, template_hashes
from emberbox.service.tenancy.keys import e2b_form
from emberbox.store.db import connect
from emberbox.store.tenants import tenant_by_name
from tests.support.archives import tar_of
from tests.support.keys import emberbox_cli, make_key
from tests.support.paths import short_tmp_dir
from tests.support.servers import Server, serve_emberbox

pytestmark = [pytest.mark.vm]

CONFIG = ImageConfig(env={"GREETING": "hi", "LEVEL": "image"}, workdir="/tmp", user="user")
PROBE = ["sh", "-c", 'echo "$GREETING $LEVEL"; pwd; id -u; echo "$HOME"']


def _link_files(source: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    for name in FILE_NAMES.values():
        src = source / name
        if src.exists():
            try:
                os.link(src, dest / name)
            except OSError:
                shutil.copy2(src, dest / name)


def register_copy(
    settings: Settings,
    base: ImageInfo,
    name: str,
    image_hash: str,
    *,
    tenant: str | None = None,
    config: ImageConfig = CONFIG,
) -> ImageInfo:
    """``base``'s files registered as ``name`` with ``config`` (no build)."""
    staging = settings.images_dir / f".staging-{secrets.token_hex(4)}"
    _link_files(base.directory, staging)
    manifest = {
        **{k: v for k, v in base.manifest.items() if k in ("kernel", "modules", "files")},
        "image_hash": image_hash,
        "base": base.name,
        "layers": [{"digest": "sha256:" + "0" * 64, "size": 1, "step": "RUN true"}],
        "config": config.to_dict(),
        "created_by": "dockerfile",
    }
    try:
        return register_image(settings, name, staging, manifest, tenant=tenant)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@pytest.fixture(scope="module")
def registry_server(default_image: ImageInfo) -> Iterator[tuple[Server, Settings]]:
    data_dir = short_tmp_dir("eb-reg-")
    images_dir = data_dir / "images"
    settings = Settings(
        data_dir=data_dir,
        EMBERBOX_IMAGES_DIR=images_dir,
        tenant_max_images=1,
        image_gc_grace_s=0,
        image_template_after_build=False,
        pool_size=0,
    )
    # The default image under its own hash: its template is the one every test shares.
    register_copy(
        settings, default_image, "default", default_image.image_hash, config=ImageConfig()
    )
    env = {
        "EMBERBOX_IMAGES_DIR": str(images_dir),
        "EMBERBOX_TENANT_MAX_IMAGES": "1",
        "EMBERBOX_IMAGE_GC_GRACE_S": "0",
        "EMBERBOX_POOL_SIZE": "0",
    }
    try:
        with serve_emberbox(data_dir, **env) as server:
            try:
                yield server, settings
            finally:  # back to keyless, so that the server's clean-up sees every sandbox
                listed = json.loads(emberbox_cli(data_dir, "keys", "list", "--json").stdout)
                for tenant in {row["tenant"] for row in listed}:
                    emberbox_cli(data_dir, "keys", "revoke", tenant)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def _templates_of(settings: Settings, image_hash: str) -> list[str]:
    return [k for k, h in template_hashes(settings.templates_dir).items() if h == image_hash]


def _probe(client: httpx.Client, sandbox_id: str, **body: object) -> list[str]:
    ran = client.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"cmd": PROBE, **body})
    assert ran.status_code == 200, ran.text
    assert ran.json()["exit_code"] == 0, ran.json()
    return str(ran.json()["stdout"]).splitlines()


def test_custom_image_config_usage_409_and_collection(
    registry_server: tuple[Server, Settings], default_image: ImageInfo
) -> None:
    """A sandbox of a registered image runs as its USER in its WORKDIR with its ENV under
    the request's own; the first create makes its template, the second restores it;
    delete is 409 while a sandbox uses it, then frees the blob and its template."""
    server, settings = registry_server
    image_hash = "test" + secrets.token_hex(6)
    info = register_copy(settings, default_image, "cfg", image_hash)
    assert info.ref == "cfg" and info.config == CONFIG
    with server.client() as client:
        listed = {i["name"]: i for i in client.get("/v1/images").json()}
        assert {"default", "cfg"} <= set(listed)
        assert listed["default"]["default"] is True and listed["cfg"]["default"] is False
        detail = client.get("/v1/images/cfg").json()
        assert (detail["env"], detail["workdir"], detail["user"]) == (CONFIG.env, "/tmp", "user")
        assert (detail["base"], detail["created_by"], detail["shared"]) == (
            "default",
            "dockerfile",
            True,
        )
        assert detail["layers"][0]["step"] == "RUN true"
        assert client.get("/v1/images/nope").status_code == 404

        t0 = time.monotonic()
        first = client.post("/v1/sandboxes", json={"image": "cfg", "env": {"LEVEL": "sandbox"}})
        first_s = time.monotonic() - t0
        assert first.status_code == 201, first.text
        first_id = first.json()["id"]
        assert first.json()["image"] == "cfg"
        assert _templates_of(settings, image_hash), "the first create made the image's template"
        assert _probe(client, first_id) == ["hi sandbox", "/tmp", "1000", "/home/user"]
        assert _probe(client, first_id, env={"GREETING": "yo"}, cwd="/") == [
            "yo sandbox",
            "/",
            "1000",
            "/home/user",
        ]
        started = client.post(
            f"/v1/sandboxes/{first_id}/processes", json={"cmd": "id -un; pwd; echo $GREETING"}
        )
        assert started.status_code in (200, 201), started.text
        pid = started.json()["pid"]
        with client.stream("GET", f"/v1/sandboxes/{first_id}/processes/{pid}/output") as out:
            events = [json.loads(line) for line in out.iter_lines() if line]
        stdout = "".join(e.get("data", "") for e in events if e["type"] == "stdout")
        assert stdout == "user\n/tmp\nhi\n", events

        t0 = time.monotonic()
        second = client.post("/v1/sandboxes", json={"image": "cfg"})
        second_s = time.monotonic() - t0
        assert second.status_code == 201, second.text
        second_id = second.json()["id"]
        assert _probe(client, second_id) == ["hi image", "/tmp", "1000", "/home/user"]
        print(f"create of a fresh image: first {first_s:.2f} s, second {second_s:.2f} s")

        usage = client.get("/v1/images/cfg").json()["usage"]
        assert set(usage["sandboxes"]) == {first_id, second_id}
        refused = client.delete("/v1/images/cfg")
        assert refused.status_code == 409, refused.text
        assert first_id in refused.json()["error"]["message"]
        assert client.delete("/v1/images/default").status_code == 409  # the server's default
        for sandbox_id in (first_id, second_id):
            assert client.delete(f"/v1/sandboxes/{sandbox_id}").status_code == 204
        deleted = client.delete("/v1/images/cfg")
        assert deleted.status_code == 200, deleted.text
        assert deleted.json()["freed_bytes"] > 0
        assert not (settings.images_dir / "blobs" / image_hash).exists()
        assert not _templates_of(settings, image_hash)
        assert (settings.images_dir / "blobs" / default_image.image_hash).is_dir()
        assert client.get("/v1/images/cfg").status_code == 404


def test_tenants_see_their_own_images_and_the_shared_ones(
    registry_server: tuple[Server, Settings], default_image: ImageInfo
) -> None:
    """Alice's image is hers: Bob cannot see, use or delete it, nor delete a shared one;
    Alice's sandbox of it runs; her second image is past her quota; deleting hers keeps
    the blob the shared default still links."""
    server, settings = registry_server
    alice = make_key(settings.data_dir, "--name", "alice")
    bob = make_key(settings.data_dir, "--name", "bob")
    conn = connect(settings.db_path)
    try:
        alice_row = tenant_by_name(conn, "alice")
    finally:
        conn.close()
    assert alice_row is not None
    # The default's content under Alice's name: one blob for two names (and the default's
    # template serves both).
    image_hash = default_image.image_hash
    mine = register_copy(settings, default_image, "mine", image_hash, tenant=alice_row.id)
    assert mine.ref == f"tenants/{alice_row.id}/mine" and mine.directory.name == image_hash
    with pytest.raises(errors.QuotaExceeded, match="at most 1 images"):
        register_copy(settings, default_image, "second", image_hash, tenant=alice_row.id)
    as_alice = {"Authorization": f"Bearer {alice}"}
    as_bob = {"Authorization": f"Bearer {bob}"}
    with httpx.Client(base_url=server.url, timeout=300) as client:
        seen = {i["name"]: i["shared"] for i in client.get("/v1/images", headers=as_alice).json()}
        assert seen["mine"] is False and seen["default"] is True
        bobs = [i["name"] for i in client.get("/v1/images", headers=as_bob).json()]
        assert "mine" not in bobs and "default" in bobs
        assert client.get("/v1/images/mine", headers=as_bob).status_code == 404
        assert client.delete("/v1/images/mine", headers=as_bob).status_code == 404
        refused = client.post("/v1/sandboxes", json={"image": "mine"}, headers=as_bob)
        assert refused.status_code == 400 and "unknown image 'mine'" in refused.text
        assert "mine" not in json.dumps(refused.json()["error"].get("available", []))
        assert client.delete("/v1/images/default", headers=as_bob).status_code == 409

        created = client.post("/v1/sandboxes", json={"image": "mine"}, headers=as_alice)
        assert created.status_code == 201, created.text
        sandbox_id = created.json()["id"]
        assert created.json()["image"] == "mine"
        assert _probe_as(client, sandbox_id, as_alice) == [" ", "/", "0", "/root"]
        usage = client.get("/v1/images/mine", headers=as_alice).json()["usage"]
        assert usage["sandboxes"] == [sandbox_id]
        assert client.delete("/v1/images/mine", headers=as_alice).status_code == 409
        assert client.delete(f"/v1/sandboxes/{sandbox_id}", headers=as_alice).status_code == 204
        assert client.delete("/v1/images/mine", headers=as_alice).status_code == 200
        assert client.get("/v1/images/mine", headers=as_alice).status_code == 404
        assert (settings.images_dir / "blobs" / image_hash).is_dir()  # "default" links it


def _probe_as(client: httpx.Client, sandbox_id: str, headers: dict[str, str]) -> list[str]:
    ran = client.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"cmd": PROBE}, headers=headers)
    assert ran.status_code == 200, ran.text
    return str(ran.json()["stdout"]).splitlines()


def _tenant_id(settings: Settings, name: str) -> str:
    conn = connect(settings.db_path)
    try:
        row = tenant_by_name(conn, name)
    finally:
        conn.close()
    assert row is not None
    return row.id


def test_a_snapshot_keeps_its_image_until_the_snapshot_is_deleted(
    registry_server: tuple[Server, Settings], default_image: ImageInfo
) -> None:
    """No sandbox runs the image any more, but a snapshot of one does: the delete is
    409 naming the snapshot (and no sandbox); once the snapshot is gone it succeeds."""
    server, settings = registry_server
    key = make_key(settings.data_dir, "--name", "snapper")
    tenant = _tenant_id(settings, "snapper")
    # The default's content (its template serves the create) under the tenant's name.
    register_copy(settings, default_image, "snapped", default_image.image_hash, tenant=tenant)
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=server.url, timeout=300, headers=headers) as client:
        created = client.post("/v1/sandboxes", json={"image": "snapped"})
        assert created.status_code == 201, created.text
        sandbox_id = created.json()["id"]
        taken = client.post(f"/v1/sandboxes/{sandbox_id}/snapshots")
        assert taken.status_code == 201, taken.text
        snapshot_id = taken.json()["id"]
        assert taken.json()["image"] == "snapped"
        assert client.delete(f"/v1/sandboxes/{sandbox_id}").status_code == 204

        usage = client.get("/v1/images/snapped").json()["usage"]
        assert usage["sandboxes"] == [] and usage["snapshots"] == [snapshot_id]
        refused = client.delete("/v1/images/snapped")
        assert refused.status_code == 409, refused.text
        message = refused.json()["error"]["message"]
        assert f"image 'snapped' is in use by snapshots {snapshot_id};" in message
        assert client.get("/v1/images/snapped").status_code == 200  # still there

        assert client.delete(f"/v1/snapshots/{snapshot_id}").status_code == 204
        deleted = client.delete("/v1/images/snapped")
        assert deleted.status_code == 200, deleted.text
        assert client.get("/v1/images/snapped").status_code == 404
        assert (settings.images_dir / "blobs" / default_image.image_hash).is_dir()


MARKER = "/etc/emberbox-test-built-over-http"
BUILT_DOCKERFILE = f"FROM default\nRUN echo built over http > {MARKER}\n"


@dataclass(frozen=True)
class HttpBuild:
    """The image ``name`` built by ``key``'s tenant through ``POST /v1/images``."""

    name: str
    key: str
    events: list[dict[str, object]]


@pytest.fixture(scope="module")
def http_build(registry_server: tuple[Server, Settings]) -> HttpBuild:
    """One real build (its RUN runs in a builder VM: ``no_cache``, so also when the
    shared layer cache has it) streamed over HTTP; the server makes its template."""
    server, settings = registry_server
    key = make_key(settings.data_dir, "--name", "maker")
    body = tar_of({"Dockerfile": BUILT_DOCKERFILE.encode()})
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/x-tar"}
    params = {"name": "marked", "no_cache": "true"}
    events: list[dict[str, object]] = []
    with (
        httpx.Client(base_url=server.url, timeout=600) as client,
        client.stream("POST", "/v1/images", params=params, content=body, headers=headers) as out,
    ):
        assert out.status_code == 200, out.read()
        assert out.headers["content-type"].startswith("application/x-ndjson")
        events = [json.loads(line) for line in out.iter_lines() if line]
    return HttpBuild("marked", key, events)


def test_a_build_over_http_streams_its_steps_and_registers_the_image(
    registry_server: tuple[Server, Settings], http_build: HttpBuild
) -> None:
    """NDJSON events: the RUN step running then done in a builder VM, its output, a
    final ``done`` naming the image; then the tenant's list and detail show it."""
    server, _ = registry_server
    events = http_build.events
    assert events and (events[-1]["kind"], events[-1]["image"]) == ("done", "marked"), events
    assert not [e for e in events if e["kind"] == "error"], events
    steps = [e for e in events if e["kind"] == "step"]
    assert [e["state"] for e in steps] == ["running", "done"], steps
    assert steps[-1]["step"] == 1 and steps[-1]["total"] == 1
    assert f"echo built over http > {MARKER}" in str(steps[-1]["instruction"])
    headers = {"Authorization": f"Bearer {http_build.key}"}
    with httpx.Client(base_url=server.url, timeout=60, headers=headers) as client:
        listed = {i["name"]: i for i in client.get("/v1/images").json()}
        assert listed["marked"]["shared"] is False
        assert listed["marked"]["base"] == "default"
        assert listed["marked"]["created_by"] == "dockerfile"
        assert [layer["step"] for layer in listed["marked"]["layers"]] == [
            f"RUN echo built over http > {MARKER}"
        ]


def test_the_e2b_front_resolves_template_ids_through_the_registry(
    registry_server: tuple[Server, Settings], http_build: HttpBuild
) -> None:
    """``POST /e2b/v2/sandboxes {"templateID": "marked"}`` with the builder's E2B key
    boots the built image (its sandbox has the file the build wrote); another tenant's
    create of that template gets the answer of a name nobody has."""
    server, settings = registry_server
    mine = {"X-API-Key": e2b_form(http_build.key)}
    other = {"X-API-Key": e2b_form(make_key(settings.data_dir, "--name", "outsider"))}
    with httpx.Client(base_url=server.url, timeout=300) as client:
        created = client.post("/e2b/v2/sandboxes", json={"templateID": "marked"}, headers=mine)
        assert created.status_code == 201, created.text
        sandbox_id = created.json()["sandboxID"]
        assert created.json()["templateID"] == "marked"
        try:
            ran = client.post(
                f"/v1/sandboxes/{sandbox_id}/exec",
                json={"cmd": ["cat", MARKER]},
                headers={"Authorization": f"Bearer {http_build.key}"},
            )
            assert ran.status_code == 200, ran.text
            assert (ran.json()["exit_code"], ran.json()["stdout"]) == (0, "built over http\n")
        finally:
            killed = client.delete(f"/e2b/sandboxes/{sandbox_id}", headers=mine)
            assert killed.status_code == 204, killed.text

        theirs = client.post("/e2b/v2/sandboxes", json={"templateID": "marked"}, headers=other)
        nobodys = client.post("/e2b/v2/sandboxes", json={"templateID": "nosuch"}, headers=other)
        # E2B's answer for a template nobody has (404), the same for another tenant's.
        assert theirs.status_code == nobodys.status_code == 404, theirs.text
        assert theirs.json() == {"code": 404, "message": "template 'marked' not found"}
        assert nobodys.json() == {"code": 404, "message": "template 'nosuch' not found"}
        listed = client.get("/e2b/v2/sandboxes", headers=other)
        assert listed.status_code == 200 and listed.json() == [], listed.text


def test_deleting_an_image_frees_its_template_though_a_spare_vmm_maps_it(
    registry_server: tuple[Server, Settings], http_build: HttpBuild
) -> None:
    """A restore of the built image's template leaves a spare VMM (QEMU waiting for that
    template's state, its RAM mapped) for the next create; the image's delete kills it,
    so the blob and the template are collected at once instead of staying held."""
    server, settings = registry_server
    headers = {"Authorization": f"Bearer {http_build.key}"}
    with httpx.Client(base_url=server.url, timeout=300, headers=headers) as client:
        image_hash = client.get("/v1/images/marked").json()["image_hash"]
        (template_key,) = _templates_of(settings, image_hash)  # the build made it
        template = settings.templates_dir / template_key
        created = client.post("/v1/sandboxes", json={"image": "marked"})
        assert created.status_code == 201, created.text
        assert client.delete(f"/v1/sandboxes/{created.json()['id']}").status_code == 204
        deadline = time.monotonic() + 60
        while not held_paths([template]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert held_paths([template]), "a spare VMM maps the template after a restore"

        deleted = client.delete("/v1/images/marked")
        assert deleted.status_code == 200, deleted.text
        assert deleted.json()["freed_bytes"] > 0
        assert not held_paths([template]) and not template.exists()
        assert not (settings.images_dir / "blobs" / image_hash).exists()
