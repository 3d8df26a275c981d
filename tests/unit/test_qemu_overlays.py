"""Fresh overlays: the first over a backing file comes from qemu-img, later ones are
copies of its bytes (qemu-img writes nothing else into them). Real files and qemu-img."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from emberbox.vmm.qemu import files, qcow2
from emberbox.vmm.qemu.argv import QemuPaths

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(shutil.which("qemu-img") is None, reason="no qemu-img"),
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def no_cached_overlays() -> None:
    files._FRESH_OVERLAYS.clear()


def raw_disk(path: Path, mib: int) -> Path:
    with path.open("wb") as f:
        f.truncate(mib << 20)
    return path


async def make(tmp_path: Path, name: str, backing: Path) -> Path:
    work_dir = tmp_path / name
    await files.make_overlay("qemu-img", work_dir, backing, "raw")
    return QemuPaths(work_dir).overlay


async def test_a_copied_overlay_is_the_one_qemu_img_makes(tmp_path: Path) -> None:
    backing = raw_disk(tmp_path / "root", 8)
    first = await make(tmp_path, "a", backing)
    assert len(files._FRESH_OVERLAYS) == 1
    second = await make(tmp_path, "b", backing)  # a copy: no qemu-img
    assert second.read_bytes() == first.read_bytes()
    assert stat.S_IMODE(os.stat(second).st_mode) == files.PRIVATE_FILE_MODE
    header = qcow2.read_header(second)
    assert header.backing == backing and header.virtual_size == 8 << 20
    assert qcow2.backing_chain(second) == [
        qcow2.Layer(second, "qcow2"),
        qcow2.Layer(backing, "raw"),
    ]


async def test_another_backing_state_gets_its_own_overlay(tmp_path: Path) -> None:
    """A backing file that changed (here: its size) is not served a stale copy."""
    backing = raw_disk(tmp_path / "root", 8)
    await make(tmp_path, "a", backing)
    raw_disk(backing, 16)
    os.utime(backing, ns=(1, 1))  # and another mtime, whatever the clock's resolution
    grown = await make(tmp_path, "b", backing)
    assert qcow2.read_header(grown).virtual_size == 16 << 20
    assert len(files._FRESH_OVERLAYS) == 2
