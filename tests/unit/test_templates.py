"""The template cache's bound on how many shapes get a template (no VM)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emberbox import errors
from emberbox.config import Settings
from emberbox.service.vm.templates import CURRENT, LAYOUT, META, Templates


def _template(root: Path, key: str, layout: str = LAYOUT) -> None:
    generation = root / key / "gen1"
    generation.mkdir(parents=True)
    (generation / META).write_text(json.dumps({"layout": layout, "key": key}))
    (root / key / CURRENT).symlink_to("gen1")


def _templates(tmp_path: Path, limit: int) -> Templates:
    return Templates(Settings(cache_dir=tmp_path, data_dir=tmp_path / "data", templates_max=limit))


def test_a_new_shape_past_templates_max_is_refused_naming_the_quota(tmp_path: Path) -> None:
    """With templates_max templates on disk, a new key gets QuotaExceeded (the create
    then boots cold) instead of leaving another template behind."""
    templates = _templates(tmp_path, limit=2)
    _template(templates.root, "a")
    _template(templates.root, "b")
    with pytest.raises(errors.QuotaExceeded) as caught:
        templates._check_room("c")
    assert caught.value.details["quota"] == "templates_max"
    assert "templates_max=2" in caught.value.message


def test_rebuilding_a_held_key_and_old_layouts_do_not_count(tmp_path: Path) -> None:
    """A key that already has a template may be rebuilt, and templates of an earlier
    LAYOUT (ignored by this version) do not use up the limit."""
    templates = _templates(tmp_path, limit=2)
    _template(templates.root, "a")
    _template(templates.root, "b")
    templates._check_room("a")  # a rebuild of an existing key
    _template(templates.root, "old1", layout="0")
    _template(templates.root, "old2", layout="0")
    one_held = _templates(tmp_path, limit=3)
    one_held._check_room("c")


def test_when_full_templates_whose_image_is_gone_make_room(tmp_path: Path) -> None:
    """At the limit, a template whose image left the images dir it was made from (a
    deleted image, a removed temporary images dir) is deleted to make room; one whose
    image is still there, or that does not say where it came from, is kept."""
    templates = _templates(tmp_path, limit=2)
    images = tmp_path / "images"
    (images / "blobs" / "alive").mkdir(parents=True)
    for key, image_hash in (("kept", "alive"), ("gone", "deleted")):
        _template(templates.root, key)
        meta = templates.root / key / "gen1" / META
        fields = json.loads(meta.read_text())
        meta.write_text(json.dumps(fields | {"image_hash": image_hash, "images_dir": str(images)}))
    templates._check_room("new")
    assert not (templates.root / "gone").exists()
    assert (templates.root / "kept" / CURRENT / META).is_file()
    _template(templates.root, "unknown")  # no images_dir: kept, and the cache is full again
    with pytest.raises(errors.QuotaExceeded):
        templates._check_room("new")
    assert (templates.root / "unknown").is_dir()
