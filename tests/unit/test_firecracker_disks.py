"""Firecracker disks without copies (issue #16): the shared read-only rootfs, the per-VM
scratch drive and its sparse copies, the base record a restore checks, the in-guest
overlay the init mounts, and a snapshot whose pause fails leaving nothing behind. No VM."""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

import pytest

from emberbox.errors import HostError, SnapshotMismatch, VMMError
from emberbox.images import initramfs
from emberbox.vmm.firecracker import api as fc_api
from emberbox.vmm.firecracker import driver as fc_driver
from emberbox.vmm.firecracker.api import ApiRequest, BootPlan
from emberbox.vmm.firecracker.files import (
    Layout,
    check_base_record,
    clone_file,
    data_extents,
    link_base,
    make_scratch,
    write_base_record,
)

EXT4_MAGIC_OFFSET = 1024 + 0x38  # s_magic in the superblock


class Running:
    """A VMM process that runs until killed."""

    pid = 4242

    def __init__(self) -> None:
        self.status: int | None = None

    def poll(self) -> int | None:
        return self.status

    def kill(self) -> None:
        self.status = -9


def _sparse_file(path: Path, size: int, chunks: dict[int, bytes]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in chunks.items():
            f.seek(offset)
            f.write(data)


def test_boot_requests_attach_the_rootfs_read_only_and_a_scratch_drive() -> None:
    """Root drive read-only, then the writable scratch; the init is told which it is."""
    plan = BootPlan(1, 256, "/k", "/i", "rootfs.ext4", "v.sock", "l", "m", ("quiet",), 3, "s.ext4")
    requests = fc_api.boot_requests(plan)
    drives = [r for r in requests if r.path.startswith("/drives/")]
    assert drives == [
        ApiRequest("PUT", "/drives/rootfs", fc_api.root_drive_payload("rootfs.ext4")),
        ApiRequest("PUT", "/drives/scratch", fc_api.scratch_drive_payload("s.ext4")),
    ]
    assert drives[0].body is not None and drives[0].body["is_read_only"] is True
    assert drives[1].body is not None and drives[1].body["is_read_only"] is False
    args = next(r for r in requests if r.path == "/boot-source").body
    assert args is not None
    assert args["boot_args"].endswith("emberbox.overlay=/dev/vdb quiet")


def test_without_scratch_the_root_drive_stays_writable_and_no_flag() -> None:
    """A plan without scratch (no overlay) keeps the old single writable drive."""
    plan = BootPlan(1, 256, "/k", "/i", "rootfs.ext4", "v.sock", "l", "m")
    requests = fc_api.boot_requests(plan)
    drives = [r for r in requests if r.path.startswith("/drives/")]
    assert len(drives) == 1 and drives[0].body is not None
    assert drives[0].body["is_read_only"] is False
    boot = next(r for r in requests if r.path == "/boot-source").body
    assert boot is not None and "emberbox.overlay" not in boot["boot_args"]


def test_the_init_mounts_the_overlay_the_driver_asks_for() -> None:
    """The init reads the very flag the driver sets, loads overlay, and keeps the plain
    writable mount for guests without it (QEMU)."""
    init = initramfs.render_init(["overlay"])
    assert f"{fc_api.OVERLAY_BOOT_ARG}=*)" in init
    assert 'mount -t ext4 -o ro,noload "$root" /base' in init
    assert "upperdir=/scratch/upper,workdir=/scratch/work /newroot" in init
    assert '[ -z "$overlay" ] && ! mount -t ext4 -o rw,noatime "$root" /newroot' in init
    assert "overlay" in initramfs.GUEST_MODULES
    assert init.index("emberbox.overlay") < init.index("switch_root")


def test_scratch_is_an_empty_sparse_private_ext4(tmp_path: Path) -> None:
    """make_scratch: a 2 GiB ext4 costing about a megabyte, mode 0600, replacing any file."""
    scratch = tmp_path / "scratch.ext4"
    scratch.write_bytes(b"stale")
    make_scratch(scratch, 2048)
    st = scratch.stat()
    assert st.st_size == 2048 << 20
    assert st.st_blocks * 512 < 8 << 20
    assert oct(st.st_mode & 0o777) == "0o600"
    with open(scratch, "rb") as f:
        f.seek(EXT4_MAGIC_OFFSET)
        assert struct.unpack("<H", f.read(2))[0] == 0xEF53


def test_scratch_without_mkfs_is_a_clear_host_error(tmp_path: Path) -> None:
    with pytest.raises(HostError, match="install the e2fsprogs package"):
        make_scratch(tmp_path / "s", 16, mkfs=str(tmp_path / "no-mkfs"))


def test_sparse_clone_reads_only_the_data_extents(tmp_path: Path) -> None:
    """A 4 GiB sparse file with three islands of data copies byte for byte, as sparse."""
    src = tmp_path / "scratch.ext4"
    chunks = {0: b"head", 1 << 30: b"middle" * 1000, (4 << 30) - 4: b"tail"}
    _sparse_file(src, 4 << 30, chunks)
    with open(src, "rb") as f:
        extents = data_extents(f.fileno(), 4 << 30)
    assert 1 <= len(extents) <= 3
    assert sum(end - start for start, end in extents) < 1 << 20
    dest = tmp_path / "copy.ext4"
    clone_file(src, dest)
    assert dest.stat().st_size == 4 << 30
    assert dest.stat().st_blocks * 512 < 1 << 20
    with open(dest, "rb") as f:
        for offset, data in chunks.items():
            f.seek(offset)
            assert f.read(len(data)) == data
        f.seek(1 << 20)
        assert f.read(4096) == bytes(4096)


def test_the_base_is_linked_never_copied(tmp_path: Path) -> None:
    """A symlink outside a jail, a hard link in one: the same inode, no new blocks."""
    base = tmp_path / "rootfs.ext4"
    _sparse_file(base, 64 << 20, {0: b"ext4"})
    link_base(base, tmp_path / "vm-rootfs", jailed=False)
    assert (tmp_path / "vm-rootfs").is_symlink()
    assert (tmp_path / "vm-rootfs").samefile(base)
    link_base(base, tmp_path / "jail-rootfs", jailed=True)
    assert not (tmp_path / "jail-rootfs").is_symlink()
    assert os.stat(tmp_path / "jail-rootfs").st_ino == base.stat().st_ino


def test_the_base_record_refuses_another_rootfs(tmp_path: Path) -> None:
    """A snapshot's scratch only means something over the rootfs it was taken over."""
    base = tmp_path / "rootfs.ext4"
    base.write_bytes(b"one image")
    snap = tmp_path / "snap"
    snap.mkdir()
    write_base_record(snap, base)
    check_base_record(snap, base)  # the same file: fine
    os.utime(base, ns=(1, 1))  # rebuilt since (same size, other mtime)
    with pytest.raises(SnapshotMismatch, match="rebuilt since"):
        check_base_record(snap, base)
    (snap / "base.json").write_text("{not json")
    with pytest.raises(SnapshotMismatch, match=r"no readable base\.json"):
        check_base_record(snap, base)


def test_a_failed_pause_leaves_no_snapshot_folder(tmp_path: Path) -> None:
    """snapshot(): when the pause itself is refused, dest is gone and nothing resumed."""
    calls: list[ApiRequest] = []

    async def main() -> None:
        layout = Layout(tmp_path, tmp_path, tmp_path / "api.sock", str(tmp_path / "api.sock"))
        vm = fc_driver.FirecrackerVM(
            "vm",
            layout,
            Running(),
            base=tmp_path / "rootfs.ext4",
            version=lambda: "1.14.2",
            console_max_bytes=1 << 16,
            api_timeout_s=1.0,
            snapshot_timeout_s=1.0,
        )

        async def refuse(req: ApiRequest, timeout_s: float | None = None) -> None:
            calls.append(req)
            raise VMMError("Firecracker refused PATCH /vm (HTTP 400): not running")

        vm.api.request = refuse  # type: ignore[method-assign]
        dest = tmp_path / "snaps" / "s1"
        try:
            with pytest.raises(VMMError, match="refused PATCH /vm"):
                await vm.snapshot(dest)
            assert not dest.exists()
        finally:
            await vm.kill()

    asyncio.run(main())
    assert [(r.path, r.body) for r in calls] == [("/vm", {"state": "Paused"})]
