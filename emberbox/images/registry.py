"""Registered guest images: ``<images_dir>/<name>`` links to a content-addressed build.

Layout::

    images/
      default -> blobs/3f2a…        (swapped atomically by a rebuild)
      blobs/3f2a…/manifest.json, vmlinuz, vmlinux, initramfs.cpio, rootfs.ext4

Running sandboxes keep pointing at the blob they booted from, so a rebuild never pulls
a disk from under a VM. Callers name images; they never pass host paths.
"""

from __future__ import annotations

import builtins
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from emberbox.config import Settings
from emberbox.errors import ImageNotFound
from emberbox.vmm.base import BootFiles

MANIFEST = "manifest.json"
FILE_NAMES = {
    "kernel": "vmlinuz",
    "vmlinux": "vmlinux",
    "initrd": "initramfs.cpio",
    "rootfs": "rootfs.ext4",
}


@dataclass(frozen=True)
class ImageInfo:
    name: str
    directory: Path  # the resolved blob directory
    manifest: dict[str, Any]
    files: BootFiles
    size_bytes: int
    created_at: datetime

    @property
    def image_hash(self) -> str:
        return str(self.manifest.get("image_hash", self.directory.name))

    @property
    def kernel_release(self) -> str:
        return str(self.manifest.get("kernel", {}).get("release", ""))


def guest_files(directory: Path) -> BootFiles:
    return BootFiles(**{kind: directory / name for kind, name in FILE_NAMES.items()})


def _disk_usage(directory: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in directory.iterdir() if p.is_file())


def load_image(name: str, link: Path) -> ImageInfo | None:
    """The image behind ``link``, or None when it is incomplete or unreadable."""
    directory = link.resolve()
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    files = guest_files(directory)
    if not all(p.is_file() for p in (files.kernel, files.initrd, files.rootfs)):
        return None
    created = datetime.fromtimestamp((directory / MANIFEST).stat().st_mtime, UTC)
    return ImageInfo(name, directory, manifest, files, _disk_usage(directory), created)


class ImageRegistry:
    """Looks images up by name in ``settings.images_dir``."""

    def __init__(self, settings: Settings) -> None:
        self.root = settings.images_dir

    def list(self) -> list[ImageInfo]:
        if not self.root.is_dir():
            return []
        found = []
        for link in sorted(self.root.iterdir()):
            if link.name.startswith(".") or link.name == "blobs":
                continue
            info = load_image(link.name, link)
            if info is not None:
                found.append(info)
        return found

    def names(self) -> builtins.list[str]:
        return [info.name for info in self.list()]

    def get(self, name: str) -> ImageInfo:
        if "/" not in name and name not in (".", "..", "blobs") and name:
            info = load_image(name, self.root / name)
            if info is not None:
                return info
        raise ImageNotFound(name, self.names())

    def find_by_path(self, path: str) -> tuple[ImageInfo, str] | None:
        """The image and file kind that ``path`` names, if it is a registered image's file.

        Only resolves the path (no open, no read): anything else on the host is refused
        by the caller.
        """
        try:
            wanted = Path(path).resolve()
        except (OSError, RuntimeError, ValueError):
            return None
        for info in self.list():
            for kind in FILE_NAMES:
                if getattr(info.files, kind).resolve() == wanted:
                    return info, kind
        return None
