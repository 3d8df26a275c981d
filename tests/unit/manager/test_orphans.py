"""Telling our VMMs and their leftovers from anything else: /proc parsing and the path
checks of the orphan sweep (no manager)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from emberbox.service.sandboxes import orphans
from emberbox.vmm import host


def test_parse_cmdline_splits_on_nul() -> None:
    """cmdline bytes become argv; a trailing NUL and empty input are handled."""
    assert host.parse_cmdline(b"qemu\0-name\0x\0") == ("qemu", "-name", "x")
    assert host.parse_cmdline(b"") == ()
    assert host.parse_cmdline(b"a\0\0b") == ("a", "", "b")


def test_parse_stat_state_survives_odd_names() -> None:
    """The state letter is found even when the command name has spaces and parentheses."""
    assert host.parse_stat_state("42 (qemu) S 1 42 42") == "S"
    assert host.parse_stat_state("42 (a) b) (c) Z 1 2") == "Z"


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("/v/ab", True),
        ("/v/ab/", True),
        ("path=/v/ab/agent.sock,server=on", True),
        ("file:/v/ab", True),
        ("/v/abc/agent.sock", False),
        ("/old/v/ab/agent.sock", False),
        ("/v/a", False),
    ],
)
def test_mentions_path_respects_boundaries(arg: str, expected: bool) -> None:
    """A work dir matches only as a whole path, never as a prefix of a longer name."""
    assert orphans.mentions_path(["qemu", arg], Path("/v/ab")) is expected


def test_referenced_children_names_entries_under_a_dir() -> None:
    """Every child of vms_dir named anywhere in argv is found, once."""
    args = [
        "qemu",
        "-chardev",
        "socket,path=/v/ab/agent.sock",
        "-drive",
        "file=/v/cd/overlay,if=virtio",
        "/v/ab/x",
        "/v/",
        "/other/v/zz/q",
    ]
    assert orphans.referenced_children(args, Path("/v")) == {"ab", "cd"}


def test_is_under_refuses_escapes(tmp_path: Path) -> None:
    """Only paths strictly inside vms_dir count; '..' and the dir itself do not."""
    assert orphans.is_under(tmp_path / "a", tmp_path)
    assert not orphans.is_under(tmp_path, tmp_path)
    assert not orphans.is_under(tmp_path / "a" / "..", tmp_path)
    assert not orphans.is_under(tmp_path.parent / "b", tmp_path)


def test_remove_dir_never_leaves_vms_dir(tmp_path: Path) -> None:
    """remove_dir refuses a path outside vms_dir and removes a symlink, not its target."""
    vms, outside = tmp_path / "vms", tmp_path / "keep"
    vms.mkdir()
    outside.mkdir()
    assert not orphans.remove_dir(outside, vms)
    (vms / "link").symlink_to(outside)
    assert orphans.remove_dir(vms / "link", vms)
    assert outside.is_dir() and not (vms / "link").exists()


def test_is_vmm_of_our_own_process() -> None:
    """A live process matches by its argv; a missing pid does not."""
    with contextlib.suppress(FileNotFoundError):
        me = orphans.read_process(os.getpid())
        assert me is not None and me.args
    assert not orphans.is_vmm_of(2**22 + 7, Path("/nowhere"))
