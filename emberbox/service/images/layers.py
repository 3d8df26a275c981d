"""The disks of a Dockerfile build, on the host: the base layer (the base image's root
filesystem at the builder disk's size) and each step's captured layer.

Every layer is a whole sparse raw ext4 (``qemu-img convert -O raw`` of the builder's
qcow2 overlay over the layer it booted from): a builder VM boots on any of them with the
driver's ordinary overlay, the registered image's rootfs is simply the last one (a hard
link), and no image depends on a chain of files a cache eviction could break. The price
is a copy of the used blocks per captured step (the Debian base uses ~190 MB).

The overlay is converted with its backing named explicitly (``--image-opts``), never
from its qcow2 header: QEMU held the overlay read-write, so a compromised builder could
have named any host file as its backing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
from pathlib import Path

from emberbox.errors import HostError, ImageBuildError

LAYER_FILE = "rootfs.ext4"


async def _run(argv: list[str], what: str, ok: tuple[int, ...] = (0,)) -> None:
    proc = await asyncio.to_thread(
        subprocess.run, argv, capture_output=True, text=True, check=False
    )
    if proc.returncode not in ok:
        raise ImageBuildError(f"{what} failed ({argv[0]}): {(proc.stderr or proc.stdout).strip()}")


def _tool(name: str) -> str:
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.path.exists(p)), None
    )
    if path is None:
        raise HostError(f"{name} not found: install it (make setup)")
    return path


async def grown_copy(source: Path, dest: Path, size_mib: int) -> None:
    """``dest``: a sparse copy of the ext4 ``source`` grown to ``size_mib`` (only ever
    an image emberbox made itself: the file system tools run on the host)."""
    partial = dest.with_name(dest.name + ".partial")
    try:
        await _run(["cp", "--sparse=always", str(source), str(partial)], "copying the base disk")
        os.truncate(partial, size_mib << 20)
        # e2fsck: 1 is "errors corrected"
        await _run([_tool("e2fsck"), "-f", "-p", str(partial)], "checking the base disk", (0, 1))
        await _run([_tool("resize2fs"), "-f", str(partial)], "growing the base disk")
        partial.chmod(0o644)
        os.replace(partial, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()


def convert_argv(qemu_img: str, overlay: Path, backing: Path, dest: Path) -> list[str]:
    """Flatten ``overlay`` (qcow2) over ``backing`` (raw) into the sparse raw ``dest``;
    ``-U``: the builder's QEMU (paused) still holds the overlay."""
    opts = ",".join(
        [
            "driver=qcow2",
            "file.driver=file",
            f"file.filename={_opt(overlay)}",
            "backing.driver=raw",
            "backing.file.driver=file",
            f"backing.file.filename={_opt(backing)}",
        ]
    )
    return [qemu_img, "convert", "-U", "--image-opts", opts, "-O", "raw", str(dest)]


def _opt(path: Path) -> str:
    """A path inside a QEMU option string (commas doubled)."""
    return str(path).replace(",", ",,")


async def capture(qemu_img: str, overlay: Path, backing: Path, dest: Path) -> int:
    """Write the layer ``dest`` (see :func:`convert_argv`); its size on disk in bytes."""
    partial = dest.with_name(dest.name + ".partial")
    try:
        await _run(convert_argv(qemu_img, overlay, backing, partial), "capturing the layer")
        partial.chmod(0o644)
        os.replace(partial, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    return await asyncio.to_thread(lambda: dest.stat().st_blocks * 512)


def link_or_copy(source: Path, dest: Path) -> None:
    """A hard link (the same file system) or else a sparse copy."""
    try:
        os.link(source, dest)
    except OSError:
        subprocess.run(["cp", "--sparse=always", str(source), str(dest)], check=True)
