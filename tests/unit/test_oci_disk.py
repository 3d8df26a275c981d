"""Sizing an imported image's ext4: blocks and inodes of the tree, headroom, the cap."""

from __future__ import annotations

from pathlib import Path

import pytest

from emberbox.errors import InvalidRequest
from emberbox.images import oci_disk

MIB = 1 << 20


def test_tree_usage_counts_blocks_inodes_and_hard_links_once(tmp_path: Path) -> None:
    """Files round up to 4 KiB blocks, a hard link is one inode, a long symlink takes a
    block and a short one none; every entry (and the root) needs an inode."""
    (tmp_path / "a").write_bytes(b"x" * 1000)
    (tmp_path / "b").hardlink_to(tmp_path / "a")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "c").write_bytes(b"y" * 5000)
    (tmp_path / "short").symlink_to("a")
    (tmp_path / "long").symlink_to("z" * 100)
    usage = oci_disk.tree_usage(tmp_path)
    assert usage.file_bytes == 6000
    assert usage.entries == 1 + 5  # root, a (= b), d, d/c, short, long
    # a: 1 block, d/c: 2, the long link: 1, two directories' entries: 1 each
    assert usage.block_bytes == (1 + 2 + 1 + 2) * oci_disk.BLOCK


def test_disk_plan_adds_headroom_and_inodes_within_the_cap() -> None:
    """Size: the tree plus ext4's overhead plus headroom, never over the cap; inodes for
    every entry plus mke2fs's ratio; a tree that alone passes the cap is refused."""
    small = oci_disk.TreeUsage(file_bytes=90 * MIB, block_bytes=100 * MIB, entries=1000)
    size, inodes = oci_disk.disk_plan(small, 1024, 16384)
    needed = -(-int((100 * MIB + 1000 * 256) * 1.1) // MIB) + oci_disk.FIXED_MIB
    assert size == needed + 1024
    assert inodes == 1000 + (size * MIB) // oci_disk.BYTES_PER_INODE
    assert oci_disk.disk_plan(small, 1024, 512)[0] == 512
    with pytest.raises(InvalidRequest, match="over the 128 MiB limit"):
        oci_disk.disk_plan(oci_disk.TreeUsage(0, 200 * MIB, 10), 0, 128)
    with pytest.raises(InvalidRequest, match="compressed"):
        oci_disk.check_compressed_size(200 * MIB, 128)


def test_mkfs_gets_the_inode_count() -> None:
    """The planned inode count reaches mkfs.ext4 (-N) before the image and its size."""
    argv = oci_disk.ext4_argv(Path("/src"), Path("/out/rootfs.ext4"), 1200, 90000)
    assert argv[:2] == ["mkfs.ext4", "-F"] and "-d" in argv
    assert argv[-4:] == ["-N", "90000", "/out/rootfs.ext4", "1200M"]
