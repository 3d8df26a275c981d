"""Firecracker disks without copies, against the real binary in ../shared/firecracker/bin
(issue #16).

Everything up to the guest's boot is real here: the process, every configuration request,
InstanceStart, pause, snapshot create and snapshot load (see the shared README). What the
test proves from the outside: Firecracker holds the image's rootfs open READ-ONLY (its
fdinfo), each VM writes to a scratch file of its own, no per-VM or per-snapshot file
anywhere near the rootfs's size exists, a restored VM re-attaches the same rootfs, and
the rootfs keeps its inode, size and mtime. The in-guest half (the overlay the init
mounts) is proven in a booting guest under QEMU: test_firecracker_overlay.py. A guest
never boots on these hosts' nested KVM, so once all that is checked the test is skipped
with that reason, never passed on a guest that did not boot.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from emberbox import errors
from emberbox.images.registry import ImageInfo
from emberbox.vmm import cgroups
from emberbox.vmm.base import VMConfig
from emberbox.vmm.firecracker.driver import FirecrackerDriver, FirecrackerVM
from emberbox.vmm.firecracker.jailer import JailerConfig
from tests.support.firecracker_bin import SHARED_BIN

BINARY = SHARED_BIN / "firecracker"
JAIL_UID = 64124
SMALL = 16 << 20  # what "nothing large" means: far below the 2 GiB rootfs
pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(
        not BINARY.exists() or not os.access("/dev/kvm", os.R_OK | os.W_OK),
        reason=f"needs /dev/kvm and the Firecracker release binary in {SHARED_BIN}",
    ),
]


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fcd", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _open_modes(pid: int, target: Path) -> list[int]:
    """The access modes (O_RDONLY, O_WRONLY, O_RDWR) of every fd ``pid`` has on ``target``
    (by inode: a jailed process sees it by another name)."""
    want = (target.stat().st_dev, target.stat().st_ino)
    modes = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            st = os.stat(fd)
            if (st.st_dev, st.st_ino) != want:
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text()
        except OSError:
            continue
        flags = next(line for line in info.splitlines() if line.startswith("flags:"))
        modes.append(int(flags.split()[1], 8) & os.O_ACCMODE)
    return modes


def _allocated(directory: Path, skip: tuple[str, ...] = ()) -> dict[str, int]:
    """Bytes allocated on disk by each regular file in ``directory`` (links not followed)."""
    return {
        p.name: p.lstat().st_blocks * 512
        for p in directory.rglob("*")
        if p.is_file() and not p.is_symlink() and p.name not in skip
    }


def _check_disks(vm: FirecrackerVM, root: Path, base: Path) -> None:
    """``root``: where Firecracker runs (the work dir, or the jail's root)."""
    assert vm.pid is not None
    assert _open_modes(vm.pid, base) == [os.O_RDONLY]  # opened, and read-only
    assert _open_modes(vm.pid, root / "scratch.ext4") == [os.O_RDWR]
    # The image's own files, linked in (a symlink; in a jail, hard links), and nothing else
    # of any size: a copy would be a file of its own.
    assert (root / "rootfs.ext4").samefile(base)
    linked = ("rootfs.ext4", "vmlinux", "initrd")
    for name in linked[1:]:
        assert not (root / name).exists() or (root / name).stat().st_nlink > 1
    # (A jailed clone also holds a copy of the snapshot's guest RAM: the RAM's size.)
    sizes = _allocated(root, (*linked, "memory"))
    assert all(size < SMALL for size in sizes.values()), sizes
    assert all(size < SMALL for size in _allocated(vm.work_dir).values())


@pytest.mark.parametrize("jailed", [False, True], ids=["plain", "jailed"])
def test_start_snapshot_and_restore_never_copy_or_write_the_rootfs(
    short_tmp: Path, default_image: ImageInfo, jailed: bool
) -> None:
    """Configure + InstanceStart, snapshot create, snapshot load with the real VMM, plain
    and under the real jailer: the rootfs is shared read-only throughout (a symlink, or a
    hard link in the jail) and nothing rootfs-sized is made."""
    base = default_image.files.rootfs.resolve()
    before = base.stat()
    jail = None
    if jailed:
        if os.geteuid() != 0 or not (SHARED_BIN / "jailer").exists():
            pytest.skip(f"the jailer needs root and {SHARED_BIN}/jailer")
        jail = JailerConfig(
            exec_file=BINARY,
            uid=JAIL_UID,
            gid=JAIL_UID,
            jailer_binary=str(SHARED_BIN / "jailer"),
            chroot_base_dir=short_tmp / "j",
            cgroup_version=cgroups.version() or 2,
        )
    driver = FirecrackerDriver(str(BINARY), jailer=jail, socket_timeout_s=20)

    def root(name: str) -> Path:
        return short_tmp / "j" / "firecracker" / name / "root" if jailed else short_tmp / name

    def config(name: str) -> VMConfig:
        return VMConfig(
            vm_id=name, work_dir=short_tmp / name, guest=default_image.files, memory_mib=128
        )

    async def run() -> str:
        vm = await driver.start(config("fcd1"))
        try:
            _check_disks(vm, root("fcd1"), base)
            snap = await vm.snapshot(short_tmp / "snap")
        finally:
            await vm.kill()
        names = {p.name for p in snap.directory.iterdir()}
        assert names == {"vmstate", "memory", "scratch.ext4", "base.json"}
        assert all(size < SMALL for size in _allocated(snap.directory, ("memory",)).values())
        clone = await driver.restore(config("fcd2"), snap)
        try:
            _check_disks(clone, root("fcd2"), base)
            try:
                await clone.open_agent_stream(timeout_s=5)
                return "booted"
            except (errors.VMMError, errors.AgentError, OSError, TimeoutError) as exc:
                return f"the guest did not boot: {type(exc).__name__}"
        finally:
            await clone.kill()

    outcome = asyncio.run(run())
    after = base.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns, after.st_uid, after.st_mode) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
        before.st_uid,  # never handed over to the jail's uid
        before.st_mode,
    )
    if not jailed:  # (a hard link changes the link count, hence the ctime)
        assert after.st_ctime_ns == before.st_ctime_ns
    assert after.st_nlink == before.st_nlink  # the jails' hard links are gone again
    if outcome != "booted":
        pytest.skip(f"disks checked through start, snapshot and load; {outcome} (nested KVM)")
