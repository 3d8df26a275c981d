"""The initramfs: module ordering from depends=, the init script, the cpio writer."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from emberbox.errors import ImageBuildError
from emberbox.images.initramfs import (
    PROBE_MARKER,
    CpioWriter,
    module_depends,
    module_plan,
    render_init,
    resolve_order,
)


def test_depends_read_from_modinfo() -> None:
    """depends= is read from a module's NUL-separated .modinfo strings."""
    blob = b"\x7fELF...\x00license=GPL\x00depends=virtio_ring,virtio\x00name=virtio_pci\x00"
    assert module_depends(blob) == ["virtio_ring", "virtio"]
    assert module_depends(b"\x00depends=\x00") == []


def test_dependencies_load_first() -> None:
    """virtio_ring loads before virtio, which loads before the transports and drivers."""
    deps = {
        "virtio_ring": [],
        "virtio": ["virtio_ring"],
        "virtio_pci": ["virtio_ring", "virtio"],
        "virtio_blk": ["virtio", "virtio_ring"],
    }
    order = resolve_order(["virtio_blk", "virtio_pci", "virtio-blk"], deps)
    assert order == ["virtio_ring", "virtio", "virtio_blk", "virtio_pci"]


def test_missing_or_cyclic_modules_are_errors() -> None:
    """A module that does not exist, or a cycle, fails the build with its name."""
    with pytest.raises(ImageBuildError, match="nope"):
        resolve_order(["nope"], {})
    with pytest.raises(ImageBuildError, match="cycle"):
        resolve_order(["a"], {"a": ["b"], "b": ["a"]})


def test_module_plan_reads_a_module_tree(tmp_path: Path) -> None:
    """module_plan finds .ko files anywhere under the tree and orders them."""
    (tmp_path / "kernel/drivers").mkdir(parents=True)
    (tmp_path / "kernel/drivers/virtio_ring.ko").write_bytes(b"\x00depends=\x00")
    (tmp_path / "kernel/drivers/virtio-rng.ko").write_bytes(b"\x00depends=virtio_ring\x00")
    plan = module_plan(tmp_path, ["virtio-rng"])
    assert [p.name for p in plan] == ["virtio_ring.ko", "virtio-rng.ko"]


def test_init_loads_modules_in_order_and_hands_over_to_the_agent() -> None:
    """The init insmods in the given order, mounts the root disk and execs the agent's
    package as a module, its install directory on the PYTHONPATH."""
    init = render_init(["virtio_ring", "virtio", "virtio_blk"])
    assert init.startswith("#!/bin/busybox sh\n")
    positions = [
        init.index(f"insmod /lib/modules/{m}.ko") for m in ("virtio_ring", "virtio", "virtio_blk")
    ]
    assert positions == sorted(positions)
    assert init.endswith(
        "export PYTHONPATH=/opt/emberbox\n"
        "exec switch_root /newroot /usr/bin/python3 -u -m emberbox_guest\n"
    )
    assert PROBE_MARKER in init and "emberbox.probe" in init
    result = subprocess.run(["sh", "-n"], input=init, text=True, capture_output=True)
    assert result.returncode == 0, result.stderr


def test_cpio_archive_lists_with_cpio_tool(tmp_path: Path) -> None:
    """Our newc writer produces an archive that GNU cpio reads back intact."""
    cpio = CpioWriter.new()
    cpio.directory("bin")
    cpio.file("bin/hello", b"hello world\n", 0o755)
    cpio.symlink("bin/sh", "busybox")
    archive = tmp_path / "a.cpio"
    archive.write_bytes(cpio.finish())
    assert len(archive.read_bytes()) % 512 == 0
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet", "-F", str(archive)], cwd=out, check=True)
    assert (out / "bin/hello").read_bytes() == b"hello world\n"
    assert (out / "bin/hello").stat().st_mode & 0o777 == 0o755
    assert (out / "bin/sh").readlink() == Path("busybox")
