"""Fixtures of the Firecracker contract tests: a short temp dir, the fake's request
record, tiny boot files and the spec validator."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from emberbox.vmm.base import BootFiles
from tests.support.firecracker_spec import SPEC_DIR, SPECS, SpecValidator


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temporary directory: unix socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="fc", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def record(short_tmp: Path) -> Path:
    """Where the fake firecrackers append each request they get (JSON lines)."""
    return short_tmp / "requests.jsonl"


@pytest.fixture
def guest(short_tmp: Path) -> BootFiles:
    """Tiny stand-ins for the kernel, vmlinux, initrd and root disk."""
    images = short_tmp / "img"
    images.mkdir()
    for name in ("vmlinux", "bzImage", "initrd"):
        (images / name).write_bytes(name.encode())
    (images / "rootfs.ext4").write_bytes(b"ext4" + bytes(200_000) + b"superblock")
    return BootFiles(
        kernel=images / "bzImage",
        vmlinux=images / "vmlinux",
        initrd=images / "initrd",
        rootfs=images / "rootfs.ext4",
    )


@pytest.fixture(scope="module")
def validator() -> SpecValidator:
    """The newest Firecracker API spec as a validator (the test is skipped without one)."""
    if not SPECS:
        pytest.skip(f"Firecracker API spec not found (expected {SPEC_DIR}/firecracker-api-v*.yaml)")
    return SpecValidator(yaml.safe_load(SPECS[-1].read_text()))
