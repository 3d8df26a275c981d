"""Reading a qcow2 image's header: its virtual size and its backing file.

The host hands QEMU every layer of a VM's disk as an open file descriptor, so it must
know the whole backing chain (overlay → snapshot disks → template disk → image rootfs)
itself. The chain lives in the qcow2 headers that ``qemu-img create`` wrote on the host;
a guest writes only data clusters and cannot change them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"QFI\xfb"
_EXT_END = 0
_EXT_BACKING_FORMAT = 0xE2792ACA
MAX_CHAIN = 64  # far more than fork-of-fork chains ever reach


class Qcow2Error(ValueError):
    """A file that is not a qcow2 image we can read."""


@dataclass(frozen=True)
class Qcow2Header:
    virtual_size: int  # bytes the guest sees
    backing: Path | None  # absolute (relative names are resolved against the image's dir)
    backing_format: str | None  # as recorded by `qemu-img create -F`; None if not recorded


@dataclass(frozen=True)
class Layer:
    """One file of a disk's chain, top (the VM's writable overlay) first."""

    path: Path
    format: str  # "qcow2" or "raw"


def parse_header(data: bytes, image: Path) -> Qcow2Header:
    """The fields we need from the first bytes (at least the header cluster) of ``image``."""
    if len(data) < 72 or data[:4] != MAGIC:
        raise Qcow2Error(f"{image} is not a qcow2 image")
    version, backing_offset, backing_size = struct.unpack_from(">IQI", data, 4)
    (virtual_size,) = struct.unpack_from(">Q", data, 24)
    backing = None
    if backing_offset:
        raw = data[backing_offset : backing_offset + backing_size]
        if len(raw) != backing_size:
            raise Qcow2Error(f"{image}: backing file name outside the header")
        backing = image.parent / raw.decode()
    ext_offset = struct.unpack_from(">I", data, 100)[0] if version >= 3 else 72
    return Qcow2Header(virtual_size, backing, _backing_format(data, ext_offset, image))


def _backing_format(data: bytes, offset: int, image: Path) -> str | None:
    while offset + 8 <= len(data):
        kind, length = struct.unpack_from(">II", data, offset)
        if kind == _EXT_END:
            return None
        if kind == _EXT_BACKING_FORMAT:
            return data[offset + 8 : offset + 8 + length].decode()
        offset += 8 + (length + 7) // 8 * 8
    raise Qcow2Error(f"{image}: header extensions run past the header")


def read_header(image: Path) -> Qcow2Header:
    with image.open("rb") as f:
        head = f.read(4096)
        if len(head) >= 24:
            cluster_bits = struct.unpack_from(">I", head, 20)[0]
            if 9 <= cluster_bits <= 21 and (1 << cluster_bits) > len(head):
                head += f.read((1 << cluster_bits) - len(head))
    return parse_header(head, image)


def probe_format(image: Path) -> str:
    with image.open("rb") as f:
        return "qcow2" if f.read(4) == MAGIC else "raw"


def backing_chain(overlay: Path) -> list[Layer]:
    """``overlay`` (qcow2) and every file below it, top first; the last one has no backing.

    Raises OSError for a missing layer and Qcow2Error for a chain we cannot follow.
    """
    chain = [Layer(overlay, "qcow2")]
    while chain[-1].format == "qcow2":
        header = read_header(chain[-1].path)
        if header.backing is None:
            break
        if len(chain) >= MAX_CHAIN:
            raise Qcow2Error(f"{overlay}: backing chain longer than {MAX_CHAIN}")
        # A recorded format wins: probing a raw layer's content would trust its bytes.
        fmt = header.backing_format or probe_format(header.backing)
        if fmt not in ("qcow2", "raw"):
            raise Qcow2Error(f"{chain[-1].path}: backing format {fmt!r} is not supported")
        chain.append(Layer(header.backing, fmt))
    return chain
