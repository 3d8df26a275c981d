"""The host side of QEMU's files: qcow2 chains, listening sockets, fds, the VMM user.

Real files and sockets in a temp dir (and ``qemu-img`` for real qcow2 headers); no VM.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from emberbox.errors import HostError, QuotaExceeded, VMMError
from emberbox.vmm import vmm_user
from emberbox.vmm.base import BootFiles, VMConfig
from emberbox.vmm.qemu import qcow2
from emberbox.vmm.qemu.argv import QemuPaths
from emberbox.vmm.qemu.files import check_disk_cap, make_work_dir, open_host_files
from emberbox.vmm.vmm_user import VmmUser

needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="no qemu-img")
NOBODY = VmmUser("nobody-test", 64000, 64000, ())


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def overlay(backing: Path, fmt: str, path: Path) -> Path:
    """An overlay as make_overlay makes it: qemu-img, then the host's chain record."""
    qemu_img("create", "-q", "-f", "qcow2", "-F", fmt, "-b", str(backing), str(path))
    qcow2.write_chain(path, backing, fmt)
    return path


def guest(tmp_path: Path, rootfs_mib: int = 4) -> BootFiles:
    images = tmp_path / "img"
    images.mkdir()
    for name in ("vmlinuz", "initrd"):
        (images / name).write_bytes(b"x" * 100)
    with (images / "root").open("wb") as f:
        f.truncate(rootfs_mib << 20)
    return BootFiles(images / "vmlinuz", images / "vmlinuz", images / "initrd", images / "root")


@needs_qemu_img
def test_backing_chain_follows_the_records_top_first(tmp_path: Path) -> None:
    """overlay -> snapshot disk -> template disk -> raw rootfs, from the host's records,
    with the formats the host named and sizes the guest sees."""
    files = guest(tmp_path)
    template = overlay(files.rootfs, "raw", tmp_path / "template.qcow2")
    snap = overlay(template, "qcow2", tmp_path / "snap.qcow2")
    top = overlay(snap, "qcow2", tmp_path / "overlay.qcow2")
    assert qcow2.backing_chain(top) == [
        qcow2.Layer(top, "qcow2"),
        qcow2.Layer(snap, "qcow2"),
        qcow2.Layer(template, "qcow2"),
        qcow2.Layer(files.rootfs, "raw"),
    ]
    assert qcow2.read_header(top).virtual_size == 4 << 20


@needs_qemu_img
def test_a_header_rewritten_by_qemu_is_not_followed(tmp_path: Path) -> None:
    """QEMU holds the overlay read-write: a header that names another backing file
    (here /etc/shadow, as a compromised QEMU could write) changes nothing; the chain is
    the one the host recorded when it made the overlay."""
    files = guest(tmp_path)
    top = overlay(files.rootfs, "raw", tmp_path / "overlay.qcow2")
    qemu_img("rebase", "-u", "-f", "qcow2", "-F", "raw", "-b", "/etc/shadow", str(top))
    assert qcow2.read_header(top).backing == Path("/etc/shadow")  # what QEMU could write
    assert qcow2.backing_chain(top) == [
        qcow2.Layer(top, "qcow2"),
        qcow2.Layer(files.rootfs, "raw"),
    ]


@needs_qemu_img
def test_a_layer_without_a_record_is_refused(tmp_path: Path) -> None:
    """No chain is guessed from a header: an overlay the host did not record (a
    snapshot from before the records) cannot boot, nor be built upon."""
    files = guest(tmp_path)
    bare = tmp_path / "bare.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(files.rootfs), str(bare))
    with pytest.raises(FileNotFoundError):
        qcow2.backing_chain(bare)
    with pytest.raises(FileNotFoundError):
        qcow2.write_chain(tmp_path / "over.qcow2", bare, "qcow2")


@pytest.mark.parametrize(
    "record",
    [
        b"not json",
        b'[{"path": "relative/root", "format": "raw"}]',
        b'[{"path": "/a/../etc/shadow", "format": "raw"}]',
        b'[{"path": "/img/root", "format": "vmdk"}]',
        b'[{"path": "/img/root", "format": "raw"}, {"path": "/img/b", "format": "qcow2"}]',
        b'[{"path": "/img/root", "format": "raw"}]' + b" " * (64 * 1024),
    ],
)
def test_a_record_we_cannot_trust_is_refused(tmp_path: Path, record: bytes) -> None:
    """Relative or `..` paths, unknown formats, a raw layer above another, an oversized
    or unreadable record: Qcow2Error, nothing opened."""
    qcow2.chain_record(tmp_path / "o.qcow2").write_bytes(record)
    with pytest.raises(qcow2.Qcow2Error):
        qcow2.backing_chain(tmp_path / "o.qcow2")


def test_a_record_or_a_layer_behind_a_symlink_is_refused(tmp_path: Path) -> None:
    """The record is opened O_NOFOLLOW; a recorded layer that is now a symlink (or lies
    behind one) is not opened (VMMError)."""
    files = guest(tmp_path)
    elsewhere = tmp_path / "elsewhere.chain"
    elsewhere.write_text(f'[{{"path": "{files.rootfs}", "format": "raw"}}]')
    qcow2.chain_record(tmp_path / "o.qcow2").symlink_to(elsewhere)
    with pytest.raises(OSError):
        qcow2.backing_chain(tmp_path / "o.qcow2")
    config = VMConfig("vm", tmp_path / "vms" / "vm", files)
    make_work_dir(config.work_dir)
    top = QemuPaths(config.work_dir).overlay
    top.write_bytes(b"")
    link = tmp_path / "link-to-root"
    link.symlink_to(files.rootfs)
    qcow2.chain_record(top).write_text(f'[{{"path": "{link}", "format": "raw"}}]')
    with pytest.raises(VMMError, match="symlink"):
        open_host_files(config, shared=False, user=None)


@needs_qemu_img
def test_host_files_listen_privately_and_open_every_layer(tmp_path: Path) -> None:
    """Sockets are bound and listening, mode 0600 in a 0700 dir; the overlay is open
    read-write and its backing read-only; a template's RAM file is created."""
    files = guest(tmp_path)
    config = VMConfig("vm", tmp_path / "vms" / "vm", files, memory_file=tmp_path / "memory")
    make_work_dir(config.work_dir)
    paths = QemuPaths(config.work_dir)
    overlay(files.rootfs, "raw", paths.overlay)
    host, fds = open_host_files(config, shared=True, user=None)
    try:
        assert stat.S_IMODE(config.work_dir.stat().st_mode) == 0o700
        for sock in (paths.qmp, paths.agent, paths.console):
            info = sock.stat()
            assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
        top, base = fds.disk
        assert os.readlink(f"/proc/self/fd/{top.fd}") == str(paths.overlay)
        assert _flags(top.fd) & os.O_ACCMODE == os.O_RDWR
        assert _flags(base.fd) & os.O_ACCMODE == os.O_RDONLY and base.format == "raw"
        assert top.label == str(paths.overlay) and base.label == "layer1"
        assert fds.memory is not None and (tmp_path / "memory").exists()
        assert set(host.pass_fds) >= {fds.qmp, fds.agent, fds.kernel, top.fd, fds.memory}
    finally:
        host.close()
    with pytest.raises(OSError):
        os.fstat(top.fd)  # closed in the parent once QEMU has its copies


def _flags(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GETFL)


@needs_qemu_img
def test_a_clones_ram_file_is_handed_to_the_vmm_user(tmp_path: Path) -> None:
    """QEMU 7.2 opens mem-path read-write even for share=off: the RAM file is chowned to
    the VMM user (mode 0600); the kernel must be readable by that user."""
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    files = guest(tmp_path)
    (tmp_path / "memory").write_bytes(b"\0" * 4096)
    config = VMConfig("vm", tmp_path / "vm", files, memory_file=tmp_path / "memory")
    make_work_dir(config.work_dir)
    overlay(files.rootfs, "raw", QemuPaths(config.work_dir).overlay)
    host, _ = open_host_files(config, shared=False, user=NOBODY)
    host.close()
    info = (tmp_path / "memory").stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (64000, 64000, 0o600)
    files.kernel.chmod(0o600)
    with pytest.raises(HostError, match="not readable by the VMM user"):
        open_host_files(config, shared=False, user=NOBODY)


def test_a_broken_chain_is_a_vmm_error(tmp_path: Path) -> None:
    """An overlay that cannot be read fails before QEMU starts, and nothing stays open."""
    files = guest(tmp_path)
    config = VMConfig("vm", tmp_path / "vm", files)
    make_work_dir(config.work_dir)
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(VMMError, match="disk chain"):
        open_host_files(config, shared=False, user=None)
    assert set(os.listdir("/proc/self/fd")) == before


@needs_qemu_img
def test_disk_cap_defaults_to_the_image_size_and_refuses_more(tmp_path: Path) -> None:
    """The overlay's virtual size is the most a guest can write; over the cap it is
    refused with QuotaExceeded naming the sizes."""
    files = guest(tmp_path, rootfs_mib=8)
    config = VMConfig("vm", tmp_path / "vm", files)
    make_work_dir(config.work_dir)
    overlay(files.rootfs, "raw", QemuPaths(config.work_dir).overlay)
    check_disk_cap(config, None)
    check_disk_cap(config, 8)
    with pytest.raises(QuotaExceeded, match="8 MiB, over the 4 MiB cap") as caught:
        check_disk_cap(config, 4)
    assert caught.value.details == {"disk_mib": 8, "max_disk_mib": 4}
    bigger = tmp_path / "bigger.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(bigger), "16M")
    os.replace(bigger, QemuPaths(config.work_dir).overlay)
    with pytest.raises(QuotaExceeded):
        check_disk_cap(config, None)  # bigger than the image itself


def test_vmm_user_is_resolved_only_for_root() -> None:
    """Not root, or an empty name: QEMU runs as ourselves; an unknown user names the fix."""
    assert vmm_user.resolve("", euid=0) is None
    assert vmm_user.resolve("root", euid=1000) is None
    with pytest.raises(HostError, match="useradd --system"):
        vmm_user.resolve("no-such-user-emberbox", euid=0)
    with pytest.raises(HostError, match="is root"):
        vmm_user.resolve("root", euid=0)


def test_kvm_access_is_judged_for_the_vmm_user(tmp_path: Path) -> None:
    """/dev/kvm 0600 root: refused, naming the kvm group fix; 0660 with the user's group
    or 0666: allowed."""
    device = tmp_path / "kvm"
    device.write_bytes(b"")
    member = VmmUser("vmm", 64000, 64001, (device.stat().st_gid,))
    stranger = VmmUser("other", 64000, 64001, ())
    device.chmod(0o600)
    with pytest.raises(HostError, match="usermod -aG kvm vmm"):
        vmm_user.check_kvm(member, device)
    device.chmod(0o660)
    vmm_user.check_kvm(member, device)
    with pytest.raises(HostError):
        vmm_user.check_kvm(stranger, device)
    device.chmod(0o666)
    vmm_user.check_kvm(stranger, device)


@needs_qemu_img
def test_a_layer_outside_emberbox_directories_is_refused(tmp_path: Path) -> None:
    """With disk_roots set, every layer must be under one of them: the image's root
    outside them is refused, and inside them the same chain opens."""
    files = guest(tmp_path)
    work = tmp_path / "data" / "vms" / "vm"
    outside = VMConfig("vm", work, files, disk_roots=(tmp_path / "data",))
    make_work_dir(work)
    overlay(files.rootfs, "raw", QemuPaths(work).overlay)
    with pytest.raises(VMMError, match="outside emberbox's directories"):
        open_host_files(outside, shared=False, user=None)
    inside = VMConfig("vm", work, files, disk_roots=(tmp_path / "data", tmp_path / "img"))
    host, _ = open_host_files(inside, shared=False, user=None)
    host.close()
