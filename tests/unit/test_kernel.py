"""Kernel package resolution and vmlinux extraction, without apt or a real kernel."""

from __future__ import annotations

import struct

import lz4.block
import pytest

from emberbox.errors import ImageBuildError
from emberbox.images.kernel import (
    LZ4_LEGACY_MAGIC,
    decompress_lz4_legacy,
    extract_vmlinux,
    parse_candidate,
    parse_depends,
)


def test_meta_package_dependency_is_found() -> None:
    """The kernel package is the meta package's linux-image-* dependency."""
    out = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n"
    assert parse_depends(out) == "linux-image-6.1.0-56-cloud-amd64"
    with pytest.raises(ImageBuildError):
        parse_depends("linux-image-cloud-amd64\n")


def test_candidate_version() -> None:
    """The candidate version is read from apt-cache policy; (none) is an error."""
    assert parse_candidate("x:\n  Installed: (none)\n  Candidate: 6.1.192-2\n") == "6.1.192-2"
    with pytest.raises(ImageBuildError):
        parse_candidate("x:\n  Candidate: (none)\n")


def legacy_lz4(data: bytes, block: int = 1 << 16) -> bytes:
    out = struct.pack("<I", LZ4_LEGACY_MAGIC)
    for i in range(0, len(data), block):
        comp = lz4.block.compress(data[i : i + block], store_size=False)
        out += struct.pack("<I", len(comp)) + comp
    return out + struct.pack("<I", len(data))  # the kernel's trailing size


def fake_bzimage(payload: bytes) -> bytes:
    setup_sects = 2
    head = bytearray((setup_sects + 1) * 512)
    head[0x1F1] = setup_sects
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", head, 0x248, 16, len(payload))
    return bytes(head) + b"\x00" * 16 + payload + b"tail"


def test_vmlinux_is_extracted_from_the_lz4_payload() -> None:
    """The ELF comes out of a bzImage whose payload is LZ4 legacy, multi-block."""
    elf = b"\x7fELF" + bytes(range(256)) * 1000
    assert decompress_lz4_legacy(legacy_lz4(elf)) == elf
    assert extract_vmlinux(fake_bzimage(legacy_lz4(elf))) == elf


def test_not_a_bzimage_or_not_lz4_is_a_clear_error() -> None:
    """Wrong inputs fail with a message, not a crash."""
    with pytest.raises(ImageBuildError, match="HdrS"):
        extract_vmlinux(b"\x00" * 4096)
    with pytest.raises(ImageBuildError, match="LZ4"):
        extract_vmlinux(fake_bzimage(b"\x1f\x8b gzip payload"))
