"""Host cgroup layout for v2 and v1, on a fake cgroup root (plain directories)."""

from __future__ import annotations

from pathlib import Path

from emberbox.vmm import cgroups


def test_v2_group_with_memory_swap_and_pids_limits(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    group = cgroups.create("vm1", 1 << 30, 256, root=tmp_path)
    assert group is not None and group.version == 2
    (directory,) = group.dirs
    assert directory == tmp_path / "emberbox" / "vm1"
    assert (directory / "memory.max").read_text() == str(1 << 30)
    assert (directory / "memory.swap.max").read_text() == "0"
    assert (directory / "pids.max").read_text() == "256"
    assert (tmp_path / "emberbox" / "cgroup.subtree_control").read_text() == "+memory +pids"
    group.add(4242)
    assert (directory / "cgroup.procs").read_text() == "4242"
    assert cgroups.existing("vm1", root=tmp_path) == group


def test_v1_groups_per_controller(tmp_path: Path) -> None:
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("max")
    group = cgroups.create("vm2", 512 << 20, 64, root=tmp_path)
    assert group is not None and group.version == 1
    memory, pids = group.dirs
    assert (memory / "memory.limit_in_bytes").read_text() == str(512 << 20)
    assert (pids / "pids.max").read_text() == "64"
    assert cgroups.existing("vm2", root=tmp_path) == group
    assert cgroups.existing("other", root=tmp_path) is None


def test_no_cgroup_filesystem_means_no_limits(tmp_path: Path) -> None:
    assert cgroups.version(tmp_path) is None
    assert cgroups.create("vm3", 1 << 30, 64, root=tmp_path) is None
