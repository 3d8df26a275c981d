"""The guest kernel: Debian's cloud kernel package, fetched and unpacked without installing.

``apt-get download`` fetches the .deb named by ``linux-image-cloud-amd64``'s current
dependency; ``dpkg -x`` unpacks it into the cache. QEMU boots the bzImage as is;
Firecracker needs the uncompressed ELF ``vmlinux``, which :func:`extract_vmlinux` pulls
out of the bzImage's LZ4 payload.
"""

from __future__ import annotations

import re
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import lz4.block

from emberbox.errors import ImageBuildError

META_PACKAGE = "linux-image-cloud-amd64"
LZ4_LEGACY_MAGIC = 0x184C2102
LZ4_LEGACY_BLOCK = 8 << 20


@dataclass(frozen=True)
class KernelPackage:
    name: str  # e.g. linux-image-6.1.0-56-cloud-amd64
    version: str  # e.g. 6.1.192-2


@dataclass(frozen=True)
class UnpackedKernel:
    release: str  # e.g. 6.1.0-56-cloud-amd64
    bzimage: Path
    modules_dir: Path  # .../lib/modules/<release>


def _run(argv: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ImageBuildError(
            f"`{' '.join(argv)}` failed with exit code {proc.returncode}: {proc.stderr.strip()}"
        )
    return proc.stdout


def parse_depends(text: str, prefix: str = "linux-image-") -> str:
    """The kernel package a meta package depends on, from `apt-cache depends` output."""
    for line in text.splitlines():
        match = re.match(r"\s*Depends:\s*(\S+)", line)
        if match and match.group(1).startswith(prefix):
            return match.group(1)
    raise ImageBuildError(f"no {prefix}* dependency in apt-cache output:\n{text}")


def parse_candidate(text: str) -> str:
    """The candidate version from `apt-cache policy` output."""
    match = re.search(r"Candidate:\s*(\S+)", text)
    if not match or match.group(1) == "(none)":
        raise ImageBuildError(f"no installable candidate in apt-cache policy output:\n{text}")
    return match.group(1)


def resolve_package(meta: str = META_PACKAGE) -> KernelPackage:
    """Which kernel package (and version) the meta package currently points at."""
    name = parse_depends(_run(["apt-cache", "depends", meta]))
    return KernelPackage(name, parse_candidate(_run(["apt-cache", "policy", name])))


def download(pkg: KernelPackage, downloads: Path) -> Path:
    """The package's .deb in ``downloads`` (fetched once; kept as the cache)."""
    downloads.mkdir(parents=True, exist_ok=True)
    version = pkg.version.replace(":", "%3a")
    deb = downloads / f"{pkg.name}_{version}_amd64.deb"
    if not deb.exists():
        _run(["apt-get", "download", f"{pkg.name}={pkg.version}"], cwd=downloads)
    if not deb.exists():
        raise ImageBuildError(f"apt-get download did not produce {deb}")
    return deb


def unpack(deb: Path, dest: Path) -> UnpackedKernel:
    """``dpkg -x`` the package into ``dest`` and locate the bzImage and modules."""
    if not (dest / "boot").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        _run(["dpkg", "-x", str(deb), str(dest)])
    images = sorted((dest / "boot").glob("vmlinuz-*"))
    if not images:
        raise ImageBuildError(f"no vmlinuz in {deb}")
    release = images[0].name.removeprefix("vmlinuz-")
    modules = dest / "lib" / "modules" / release
    if not modules.is_dir():
        raise ImageBuildError(f"no modules for {release} in {deb}")
    return UnpackedKernel(release, images[0], modules)


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel inside a bzImage whose payload is LZ4 (legacy frame) compressed.

    The setup header (boot protocol >= 2.08) gives the payload's offset and length,
    relative to the start of the protected-mode code after the setup sectors.
    """
    if bzimage[0x202:0x206] != b"HdrS":
        raise ImageBuildError("not a bzImage: no HdrS setup header")
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = bzimage[start : start + length]
    if len(payload) < 4 or struct.unpack_from("<I", payload)[0] != LZ4_LEGACY_MAGIC:
        raise ImageBuildError("bzImage payload is not LZ4 (legacy format)")
    elf = decompress_lz4_legacy(payload)
    if elf[:4] != b"\x7fELF":
        raise ImageBuildError("decompressed kernel payload is not an ELF file")
    return elf


def decompress_lz4_legacy(data: bytes) -> bytes:
    """Decode LZ4's legacy frame: magic, then (u32 size, block) pairs until the data ends.

    The kernel's build appends the uncompressed size as a trailing u32; a block size
    larger than what is left marks that trailer and ends the stream.
    """
    out = bytearray()
    pos = 0
    while pos + 4 <= len(data):
        (size,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if size == LZ4_LEGACY_MAGIC:
            continue
        if size == 0 or pos + size > len(data):
            break
        out += lz4.block.decompress(data[pos : pos + size], uncompressed_size=LZ4_LEGACY_BLOCK)
        pos += size
    if not out:
        raise ImageBuildError("LZ4 payload decoded to nothing")
    return bytes(out)
