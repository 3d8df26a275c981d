"""A VM disk's backing chain, from the host's own records; and reading a qcow2 header.

The host hands QEMU every layer of a VM's disk as an open file descriptor, so it must
know the whole backing chain (overlay → snapshot disks → template disk → image rootfs)
itself. It takes that chain from the record it wrote when it made each overlay
(:func:`write_chain`: ``<overlay>.chain``, root's, never handed to QEMU), never from a
qcow2 header: QEMU holds the top overlay read-write, so a compromised QEMU could name
any host file as its backing, and that overlay becomes a snapshot disk, a backing layer
of later VMs. A record lists every layer below its overlay, so one record gives the
whole chain. Every layer is an absolute path with no symlink on the way (opened with
``O_NOFOLLOW`` by :mod:`emberbox.vmm.qemu.files`).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"QFI\xfb"
_EXT_END = 0
_EXT_BACKING_FORMAT = 0xE2792ACA
MAX_CHAIN = 64  # far more than fork-of-fork chains ever reach
CHAIN_SUFFIX = ".chain"
MAX_RECORD_BYTES = 64 * 1024
FORMATS = ("qcow2", "raw")


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


def chain_record(layer: Path) -> Path:
    """Where the host records the layers below ``layer``."""
    return layer.with_name(layer.name + CHAIN_SUFFIX)


def write_chain(overlay: Path, backing: Path, backing_format: str) -> None:
    """Record, next to the new ``overlay``, the layers below it: ``backing`` and, when
    that is a qcow2 overlay itself, the layers its own record names."""
    below = [Layer(backing.resolve(strict=True), backing_format)]  # trusted now: ours
    if backing_format == "qcow2":
        below += recorded_chain(backing)
    _check_layers(below, overlay)
    body = json.dumps([{"path": str(layer.path), "format": layer.format} for layer in below])
    record = chain_record(overlay)
    partial = record.with_name(record.name + ".tmp")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(body)
    os.replace(partial, record)


def recorded_chain(layer: Path) -> list[Layer]:
    """The layers below ``layer``, top first, as the host recorded them.

    Raises OSError for a missing record and Qcow2Error for one we cannot trust.
    """
    fd = os.open(chain_record(layer), os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        raw = f.read(MAX_RECORD_BYTES + 1)
    if len(raw) > MAX_RECORD_BYTES:
        raise Qcow2Error(f"{layer}: chain record over {MAX_RECORD_BYTES} bytes")
    try:
        entries = json.loads(raw)
        below = [Layer(Path(entry["path"]), entry["format"]) for entry in entries]
    except (ValueError, TypeError, KeyError) as exc:
        raise Qcow2Error(f"{layer}: unreadable chain record: {exc}") from None
    _check_layers(below, layer)
    return below


def _check_layers(below: list[Layer], top: Path) -> None:
    if len(below) >= MAX_CHAIN:
        raise Qcow2Error(f"{top}: backing chain longer than {MAX_CHAIN}")
    for index, layer in enumerate(below):
        if layer.format not in FORMATS:
            raise Qcow2Error(f"{top}: backing format {layer.format!r} is not supported")
        if not layer.path.is_absolute() or ".." in layer.path.parts:
            raise Qcow2Error(f"{top}: backing layer {layer.path} is not an absolute path")
        if (layer.format == "raw") != (index == len(below) - 1):
            raise Qcow2Error(f"{top}: only the last layer of a chain is raw")


def backing_chain(overlay: Path) -> list[Layer]:
    """``overlay`` (qcow2) and every file below it, top first, from the host's record
    (:func:`write_chain`); the last one is the image's raw root filesystem.

    Raises OSError for a missing record and Qcow2Error for one we cannot trust.
    """
    return [Layer(overlay, "qcow2"), *recorded_chain(overlay)]
