"""The jailer command line and jail file placement (pure, or on temporary directories)."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from emberbox.errors import InvalidRequest
from emberbox.vmm.firecracker import jailer
from emberbox.vmm.firecracker.jailer import JailerConfig, jailer_command

FC = Path("/usr/local/bin/firecracker")


def _cfg(**kw: Any) -> JailerConfig:
    return JailerConfig(**{"exec_file": FC, "uid": 10_001, "gid": 10_001, **kw})


def test_command_line_with_defaults() -> None:
    """Defaults: cgroup v2 memory/cpu limits, new pid namespace, Firecracker args after --."""
    assert jailer_command(_cfg(), "vm-1", vcpus=2, memory_mib=512) == [
        "jailer",
        "--id", "vm-1",
        "--exec-file", "/usr/local/bin/firecracker",
        "--uid", "10001",
        "--gid", "10001",
        "--chroot-base-dir", "/srv/jailer",
        "--cgroup-version", "2",
        "--cgroup", f"memory.max={(512 + 64) << 20}",
        "--cgroup", "cpu.max=200000 100000",
        "--new-pid-ns",
        "--", "--api-sock", "/run/firecracker.socket",
    ]  # fmt: skip


def test_command_line_with_every_option() -> None:
    """Parent cgroup, file size limit and network namespace appear before the separator."""
    cfg = _cfg(
        jailer_binary="/opt/fc/jailer",
        chroot_base_dir=Path("/var/lib/jail"),
        parent_cgroup="emberbox",
        fsize_limit_bytes=4 << 30,
        new_pid_ns=False,
    )
    argv = jailer_command(cfg, "a1", vcpus=1, memory_mib=128, netns=Path("/run/netns/a1"))
    assert argv[0] == "/opt/fc/jailer"
    before, after = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    assert " ".join(before).endswith(
        "--parent-cgroup emberbox --resource-limit fsize=4294967296 --netns /run/netns/a1"
    )
    assert "--new-pid-ns" not in before
    assert "--chroot-base-dir /var/lib/jail" in " ".join(before)
    assert after == ["--api-sock", "/run/firecracker.socket"]


def test_cpu_max_is_vcpus_full_cpus() -> None:
    """cpu.max grants each vCPU one full host CPU per period."""
    assert jailer.cpu_max(4, 50_000) == "200000 50000"


@pytest.mark.parametrize("bad", ["", "a/b", "vm_1", "x" * 65, "../etc"])
def test_ids_the_jailer_refuses_are_refused_early(bad: str) -> None:
    """Ids outside 1-64 letters, digits and hyphens raise InvalidRequest before spawning."""
    with pytest.raises(InvalidRequest):
        jailer_command(_cfg(), bad, vcpus=1, memory_mib=128)


def test_exec_file_must_be_absolute_and_named_firecracker() -> None:
    """The jailer only execs an absolute path whose name contains 'firecracker'."""
    with pytest.raises(InvalidRequest, match="absolute"):
        jailer_command(JailerConfig(Path("firecracker"), 1, 1), "vm", 1, 128)
    with pytest.raises(InvalidRequest, match="contain"):
        jailer_command(JailerConfig(Path("/usr/bin/qemu"), 1, 1), "vm", 1, 128)


def test_jail_paths_follow_the_jailer_layout() -> None:
    """Root, API socket, pid file and cgroup dir are where the jailer puts them."""
    cfg = _cfg(exec_file=Path("/opt/firecracker-v1.16"))
    root = Path("/srv/jailer/firecracker-v1.16/vm-1/root")
    assert jailer.jail_root(cfg, "vm-1") == root
    assert jailer.api_socket_path(cfg, "vm-1") == root / "run/firecracker.socket"
    assert jailer.pid_file(cfg, "vm-1") == root / "firecracker-v1.16.pid"
    assert jailer.cgroup_dir(cfg, "vm-1") == Path("/sys/fs/cgroup/firecracker-v1.16/vm-1")
    assert jailer.cgroup_dir(_cfg(parent_cgroup="eb"), "vm-1") == Path("/sys/fs/cgroup/eb/vm-1")


def test_link_or_copy_links_on_one_filesystem(tmp_path: Path) -> None:
    """On one filesystem the jail gets a hard link: same inode, no space used."""
    src, dest = tmp_path / "vmlinux", tmp_path / "jail-vmlinux"
    src.write_bytes(b"kernel")
    jailer.link_or_copy(src, dest)
    jailer.link_or_copy(src, dest)  # an existing file from an earlier try is replaced
    assert dest.stat().st_ino == src.stat().st_ino


def test_link_or_copy_copies_across_filesystems(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When linking fails (EXDEV) the file is copied instead."""
    src, dest = tmp_path / "initrd", tmp_path / "jail-initrd"
    src.write_bytes(b"cpio")

    def no_link(a: object, b: object) -> None:
        raise OSError(errno.EXDEV, "cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    jailer.link_or_copy(src, dest)
    assert dest.read_bytes() == b"cpio" and dest.stat().st_ino != src.stat().st_ino


def test_make_and_remove_jail(tmp_path: Path) -> None:
    """The jail root and its run/ dir are made for the VM's uid and removed idempotently."""
    cfg = JailerConfig(
        exec_file=FC,
        uid=os.getuid(),
        gid=os.getgid(),
        chroot_base_dir=tmp_path / "jail",
        cgroup_root=tmp_path / "cgroup",
    )
    root = jailer.make_jail_root(cfg, "vm-1")
    assert (root / "run").is_dir() and (root / "run").stat().st_uid == os.getuid()
    jailer.cgroup_dir(cfg, "vm-1").mkdir(parents=True)
    jailer.remove_jail(cfg, "vm-1")
    assert not jailer.jail_dir(cfg, "vm-1").exists()
    assert not jailer.cgroup_dir(cfg, "vm-1").exists()
    jailer.remove_jail(cfg, "vm-1")
