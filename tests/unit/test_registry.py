"""The image registry on temp dirs: names and refs, tenant namespaces (own first, then
shared; another tenant's is unknown), register/replace/unlink, quota math, which blobs
garbage collection may take, and the image defaults applied to commands."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from emberbox import errors
from emberbox.agent_client.spec import ExecSpec, RunAs, SpawnSpec
from emberbox.config import Settings
from emberbox.images.registry import (
    FILE_NAMES,
    ImageConfig,
    ImageInfo,
    ImageQuota,
    ImageRegistry,
    check_quota,
    collectable_blobs,
    display_name,
    guest_files,
    image_ref,
    parse_ref,
    register_image,
)
from emberbox.service.catalog import image_pool_settings
from emberbox.service.images.defaults import RunDefaults, resolve_user
from emberbox.service.images.registry_service import held_paths, template_hashes

ALICE = "tn-alice"
BOB = "tn-bob"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        cache_dir=tmp_path / "cache",
        tenant_max_images=2,
        tenant_max_image_bytes=1 << 20,
    )


def staged(settings: Settings, payload: bytes = b"x") -> Path:
    directory = settings.cache_dir / f"stage-{os.urandom(4).hex()}"
    directory.mkdir(parents=True)
    for name in FILE_NAMES.values():
        (directory / name).write_bytes(payload)
    return directory


def register(
    settings: Settings,
    name: str,
    image_hash: str,
    tenant: str | None = None,
    payload: bytes = b"x",
    config: ImageConfig | None = None,
) -> None:
    manifest: dict[str, object] = {
        "image_hash": image_hash,
        "base": "default",
        "created_by": "dockerfile",
    }
    if config is not None:
        manifest["config"] = config.to_dict()
    register_image(settings, name, staged(settings, payload), manifest, tenant=tenant)


def test_refs_and_names() -> None:
    assert image_ref("grader", None) == "grader"
    assert image_ref("grader", "local") == "grader"  # the built-in tenant: shared
    assert image_ref("grader", ALICE) == f"tenants/{ALICE}/grader"
    assert parse_ref(f"tenants/{ALICE}/grader") == ("grader", ALICE)
    assert parse_ref("grader") == ("grader", None)
    for bad in ("../x", "tenants/a", "tenants/a/b/c", "blobs", "a/b", "", ".hidden"):
        assert parse_ref(bad) is None, bad
    assert display_name(f"tenants/{ALICE}/grader") == "grader"


def test_tenant_sees_its_own_then_the_shared_never_anothers(settings: Settings) -> None:
    register(settings, "default", "h-default")
    register(settings, "tools", "h-shared-tools")
    register(settings, "tools", "h-alice-tools", tenant=ALICE)  # shadows the shared one
    register(settings, "mine", "h-alice-mine", tenant=ALICE)
    registry = ImageRegistry(settings)
    assert [(i.name, i.tenant) for i in registry.list(ALICE)] == [
        ("mine", ALICE),
        ("tools", ALICE),
        ("default", None),
    ]
    assert registry.get("tools", tenant=ALICE).image_hash == "h-alice-tools"
    assert registry.get("tools", tenant=BOB).image_hash == "h-shared-tools"
    assert registry.names(BOB) == ["default", "tools"]
    with pytest.raises(errors.ImageNotFound) as caught:
        registry.get("mine", tenant=BOB)
    assert "mine" not in caught.value.available
    # Refs: Alice may name her own; Bob may not name hers; the service (no tenant) may.
    ref = f"tenants/{ALICE}/mine"
    assert registry.get(ref, tenant=ALICE).ref == ref
    with pytest.raises(errors.ImageNotFound):
        registry.get(ref, tenant=BOB)
    assert registry.get(ref).image_hash == "h-alice-mine"
    assert {i.ref for i in registry.list_all()} == {
        "default",
        "tools",
        f"tenants/{ALICE}/mine",
        f"tenants/{ALICE}/tools",
    }


def test_register_moves_the_files_and_a_rebuild_swaps_the_link(settings: Settings) -> None:
    register(settings, "app", "h1", config=ImageConfig(env={"A": "1"}, user="user"))
    registry = ImageRegistry(settings)
    first = registry.get("app")
    assert first.directory == settings.images_dir / "blobs" / "h1"
    assert first.config == ImageConfig(env={"A": "1"}, user="user")
    assert (first.base, first.created_by) == ("default", "dockerfile")
    assert not list(settings.cache_dir.glob("stage-*"))  # moved, not copied
    register(settings, "app", "h2")
    assert registry.get("app").image_hash == "h2"
    assert (settings.images_dir / "blobs" / "h1").is_dir()  # kept until collected
    # The same content again: the blob is reused, the staging dir removed.
    register(settings, "again", "h2")
    assert registry.get("again").directory == registry.get("app").directory
    assert not list(settings.cache_dir.glob("stage-*"))
    manifest = json.loads((settings.images_dir / "blobs" / "h2" / "manifest.json").read_text())
    assert manifest["ref"] == "app"


def test_register_refuses_bad_names_and_hashes(settings: Settings) -> None:
    for name in ("a/b", "../x", "blobs", "", "-x", "x" * 65):
        with pytest.raises(errors.InvalidRequest):
            register(settings, name, "h")
    with pytest.raises(errors.InvalidRequest):
        register(settings, "ok", "../evil")


def test_unlink_removes_the_name_only_in_the_own_namespace(settings: Settings) -> None:
    register(settings, "tools", "h-shared")
    register(settings, "tools", "h-alice", tenant=ALICE)
    registry = ImageRegistry(settings)
    registry.unlink("tools", tenant=ALICE)
    assert registry.get("tools", tenant=ALICE).image_hash == "h-shared"
    with pytest.raises(errors.ImageNotFound):
        registry.unlink("tools", tenant=ALICE)
    assert (settings.images_dir / "blobs" / "h-alice").is_dir()
    assert registry.remove_blob("h-alice") > 0
    assert not (settings.images_dir / "blobs" / "h-alice").exists()


def test_quota_on_count_and_bytes(settings: Settings) -> None:
    register(settings, "one", "h1", tenant=ALICE)
    register(settings, "two", "h2", tenant=ALICE)
    register(settings, "two", "h3", tenant=ALICE)  # replacing a name: still two
    with pytest.raises(errors.QuotaExceeded, match="at most 2 images"):
        register(settings, "three", "h4", tenant=ALICE)
    register(settings, "three", "h4")  # the operator's shared namespace has no quota
    big = b"x" * (600 << 10)  # 4 files: 2.4 MiB > 1 MiB
    with pytest.raises(errors.QuotaExceeded, match="bytes"):
        register(settings, "big", "h5", tenant=BOB, payload=big)
    assert ImageRegistry(settings).names(BOB) == ["three"]  # nothing registered for Bob


def test_quota_math() -> None:
    quota = ImageQuota(max_images=2, max_bytes=100)
    own = [_info("a", "h1", 40), _info("b", "h2", 40)]
    check_quota(quota, own, "a", "h9", 60)  # replaces a: 40 + 60
    with pytest.raises(errors.QuotaExceeded):
        check_quota(quota, own, "c", "h3", 1)  # a third name
    with pytest.raises(errors.QuotaExceeded):
        check_quota(quota, own, "b", "h3", 61)  # 40 + 61 > 100
    shared_blob = [_info("a", "h1", 40), _info("b", "h1", 40)]
    check_quota(ImageQuota(3, 100), shared_blob, "c", "h2", 60)  # h1 counted once: 100
    check_quota(None, own * 10, "z", "hz", 1 << 40)  # the operator: no quota


def _info(name: str, image_hash: str, size: int) -> ImageInfo:
    directory = Path("/nonexistent") / image_hash
    return ImageInfo(
        name,
        directory,
        {"image_hash": image_hash},
        guest_files(directory),
        size,
        datetime.now(UTC),
        ALICE,
    )


def test_collectable_blobs_keep_what_anything_uses() -> None:
    blobs = ["linked", "snap", "held", "free", ".staging"]
    assert collectable_blobs(blobs, ["linked"], ["snap", "held"]) == ["free"]
    assert collectable_blobs(blobs, [], blobs) == []


def test_template_hashes_and_held_paths(tmp_path: Path) -> None:
    generation = tmp_path / "templates" / "key1" / "gen"
    generation.mkdir(parents=True)
    (generation / "meta.json").write_text(json.dumps({"image_hash": "h1"}))
    (tmp_path / "templates" / "junk").mkdir()
    assert template_hashes(tmp_path / "templates") == {"key1": "h1"}
    held_file = tmp_path / "blobs" / "h1" / "rootfs.ext4"
    held_file.parent.mkdir(parents=True)
    held_file.write_bytes(b"x")
    with held_file.open("rb"):  # this process holds it open, as a VMM holds its disk
        assert str(held_file.resolve()) in held_paths([tmp_path / "blobs"])
    assert str(held_file.resolve()) not in held_paths([tmp_path / "blobs"])


PASSWD = """root:x:0:0:root:/root:/bin/bash
user:x:1000:1000::/home/user:/bin/bash
app:x:1001:1002:app:/srv/app:/bin/sh
"""
GROUP = "root:x:0:\nuser:x:1000:\nstaff:x:50:\n"


def test_resolve_user_like_dockers_user() -> None:
    assert resolve_user("user", PASSWD, GROUP).__dict__ == {
        "uid": 1000,
        "gid": 1000,
        "name": "user",
        "home": "/home/user",
    }
    assert (resolve_user("app", PASSWD, GROUP).gid, resolve_user("1001", PASSWD, GROUP).name) == (
        1002,
        "app",
    )
    assert resolve_user("user:staff", PASSWD, GROUP).gid == 50
    assert resolve_user("4242:7", PASSWD, GROUP).__dict__ == {
        "uid": 4242,
        "gid": 7,
        "name": None,
        "home": "/",
    }
    with pytest.raises(errors.InvalidRequest):
        resolve_user("nobody-here", PASSWD, GROUP)
    with pytest.raises(errors.InvalidRequest):
        resolve_user("user:nogroup", PASSWD, GROUP)


def test_run_defaults_sit_under_the_request() -> None:
    user = RunAs(1000, 1000, "user")
    defaults = RunDefaults(env={"A": "image", "B": "image"}, cwd="/app", user=user)
    spec = defaults.apply(ExecSpec(["ls"], env={"B": "call"}), {"A": "sandbox"})
    assert dict(spec.env) == {"A": "sandbox", "B": "call"}
    assert (spec.cwd, list(spec.cmd), spec.user) == ("/app", ["ls"], user)
    shell = defaults.apply(ExecSpec("echo hi", cwd="/tmp"), {})
    assert (shell.cwd, shell.cmd, shell.user) == ("/tmp", "echo hi", user)
    chosen = defaults.apply(SpawnSpec(["setpriv", "--reuid=0", "--", "id"]), {})
    assert chosen.user is None  # chose its own user
    own = defaults.apply(SpawnSpec(["id"], user=RunAs(0, 0)), {})
    assert own.user == RunAs(0, 0)
    plain = RunDefaults().apply(ExecSpec(["ls"], env={"X": "1"}), {"Y": "2"})
    assert (dict(plain.env), plain.cwd, list(plain.cmd)) == ({"Y": "2", "X": "1"}, None, ["ls"])


def test_image_pools_share_the_memory_budget(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        pool_size=1,
        default_memory_mib=512,
        pool_memory_budget_mib=1536,
        pool_images={"grader": 1, "big": 5, "default": 3, "off": 0},
    )
    pools = image_pool_settings(settings)
    assert [(s.default_image, s.pool_size, s.pool_memory_budget_mib) for s in pools] == [
        ("big", 5, 1024),
        ("grader", 1, 0),
    ]
