"""Sizing the ext4 of an imported image: room for its files, its inodes, and the
sandbox's own writes, at most a cap.

``mkfs.ext4 -d`` fails when the tree does not fit, in blocks or in inodes, so both are
counted: every file rounded up to whole 4 KiB blocks, directories and long symlinks
included, plus an inode for each entry. An image of many small files (``node_modules``)
needs far more than the sum of its sizes.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from emberbox.errors import InvalidRequest
from emberbox.images.rootfs import mkfs_argv

BLOCK = 4096
INODE_BYTES = 256
BYTES_PER_INODE = 16384  # mke2fs's default ratio: inodes for the files a sandbox adds
EXT4_OVERHEAD = 1.10  # journal, group descriptors, bitmaps
FIXED_MIB = 64  # the journal and metadata of a small file system
_FAST_SYMLINK = 60  # a symlink target this short lives in the inode


@dataclass(frozen=True)
class TreeUsage:
    file_bytes: int  # the regular files' sizes (hard links once)
    block_bytes: int  # what they, directories and long symlinks take in 4 KiB blocks
    entries: int  # inodes: one per file, directory, link or node (hard links once)


def _blocks(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def tree_usage(root: Path) -> TreeUsage:
    """What the tree under ``root`` takes, counted the way ext4 stores it."""
    seen: set[tuple[int, int]] = set()
    file_bytes = block_bytes = entries = 0
    for dirpath, dirs, names in os.walk(root):
        block_bytes += _blocks(max(len(dirs) + len(names), 1) * 32)  # directory entries
        for name in (*dirs, *names):
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            entries += 1
            if stat.S_ISREG(st.st_mode):
                file_bytes += st.st_size
                block_bytes += _blocks(st.st_size)
            elif stat.S_ISLNK(st.st_mode) and st.st_size >= _FAST_SYMLINK:
                block_bytes += BLOCK
    return TreeUsage(file_bytes, block_bytes, entries + 1)


def disk_plan(usage: TreeUsage, headroom_mib: int, max_mib: int) -> tuple[int, int]:
    """The disk's size in MiB and its inode count: the tree plus ext4's overhead plus
    ``headroom_mib``, at most ``max_mib`` (InvalidRequest when the tree alone does not
    fit); inodes for every entry plus the default ratio over the whole disk."""
    needed_bytes = (usage.block_bytes + usage.entries * INODE_BYTES) * EXT4_OVERHEAD
    needed_mib = int(-(-needed_bytes // (1 << 20))) + FIXED_MIB
    if needed_mib > max_mib:
        raise InvalidRequest(
            f"the image needs about {needed_mib} MiB, over the {max_mib} MiB limit "
            "(EMBERBOX_OCI_MAX_ROOTFS_MIB)"
        )
    size_mib = min(needed_mib + headroom_mib, max_mib)
    return size_mib, usage.entries + (size_mib << 20) // BYTES_PER_INODE


def check_compressed_size(layer_bytes: int, max_mib: int) -> None:
    """Layers that already weigh more than the cap compressed are refused before
    unpacking (they can only grow)."""
    if layer_bytes > max_mib << 20:
        raise InvalidRequest(
            f"the image's layers weigh {layer_bytes >> 20} MiB compressed, over the "
            f"{max_mib} MiB limit (EMBERBOX_OCI_MAX_ROOTFS_MIB)"
        )


def ext4_argv(source: Path, image: Path, size_mib: int, inodes: int) -> list[str]:
    """rootfs.mkfs_argv with an explicit inode count."""
    argv = mkfs_argv(source, image, size_mib)
    at = argv.index(str(image))
    return [*argv[:at], "-N", str(inodes), *argv[at:]]
