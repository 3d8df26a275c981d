"""The image registry: names resolve to content-addressed builds; host paths never leak in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emberbox.config import Settings
from emberbox.errors import ImageNotFound
from emberbox.images.registry import FILE_NAMES, ImageRegistry


def make_image(images: Path, name: str, digest: str) -> Path:
    blob = images / "blobs" / digest
    blob.mkdir(parents=True)
    for file_name in FILE_NAMES.values():
        (blob / file_name).write_bytes(b"x")
    (blob / "manifest.json").write_text(json.dumps({"image_hash": digest}))
    (images / name).symlink_to(Path("blobs") / digest)
    return blob


@pytest.fixture
def registry(tmp_path: Path) -> ImageRegistry:
    make_image(tmp_path, "default", "aaa")
    make_image(tmp_path, "polyglot", "bbb")
    (tmp_path / "broken").symlink_to("blobs/missing")
    return ImageRegistry(Settings(cache_dir=tmp_path / "cache", EMBERBOX_IMAGES_DIR=tmp_path))


def test_lookup_by_name(registry: ImageRegistry) -> None:
    """Complete images are listed by name; a dangling or partial one is not."""
    assert registry.names() == ["default", "polyglot"]
    info = registry.get("default")
    assert info.image_hash == "aaa"
    assert info.files.rootfs.name == "rootfs.ext4"


@pytest.mark.parametrize("name", ["nope", "broken", "../default", "blobs", "", "."])
def test_unknown_names_list_the_available_images(registry: ImageRegistry, name: str) -> None:
    """Unknown (or path-like) names raise ImageNotFound naming the real images."""
    with pytest.raises(ImageNotFound) as info:
        registry.get(name)
    assert info.value.available == ["default", "polyglot"]
    assert "default, polyglot" in str(info.value)


def test_find_by_path_accepts_only_registered_files(
    registry: ImageRegistry, tmp_path: Path
) -> None:
    """A registered image's file is recognised through any spelling; other paths are not."""
    found = registry.find_by_path(str(tmp_path / "default" / "rootfs.ext4"))
    assert found is not None and found[0].name == "default" and found[1] == "rootfs"
    found = registry.find_by_path(str(tmp_path / "blobs/../default/vmlinux"))
    assert found is not None and found[1] == "vmlinux"
    assert registry.find_by_path("/etc/passwd") is None
    assert registry.find_by_path(str(tmp_path / "default" / "manifest.json")) is None
    assert registry.find_by_path("\x00") is None
