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
    assert (tmp_path / "emberbox" / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
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


def test_v2_cpu_max_is_quota_and_period(tmp_path: Path) -> None:
    """cgroup v2: cpu.max holds "quota period" and the cpu controller is enabled."""
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    group = cgroups.create("vm4", 1 << 30, 64, root=tmp_path, cpu=cgroups.CpuQuota(150_000))
    assert group is not None
    assert (group.dirs[0] / "cpu.max").read_text() == "150000 100000"


def test_v1_cpu_group_under_the_cpu_hierarchy(tmp_path: Path) -> None:
    """cgroup v1: a third group under cpu (or cpu,cpuacct) with cfs period and quota,
    found again by existing() and removed with the others."""
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("max")
    (tmp_path / "cpu,cpuacct").mkdir()
    (tmp_path / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1")
    (tmp_path / "cpu").symlink_to("cpu,cpuacct")
    quota = cgroups.CpuQuota(75_000, 50_000)
    group = cgroups.create("vm5", 512 << 20, 64, root=tmp_path, cpu=quota)
    assert group is not None and len(group.dirs) == 3
    cpu = group.dirs[2]
    assert (cpu / "cpu.cfs_period_us").read_text() == "50000"
    assert (cpu / "cpu.cfs_quota_us").read_text() == "75000"
    assert cgroups.existing("vm5", root=tmp_path) == group  # the symlink counted once
    for directory in group.dirs:  # a fake root's groups hold files: empty them first
        for child in directory.iterdir():
            child.unlink()
    group.remove()
    assert cgroups.existing("vm5", root=tmp_path) is None


def test_v1_without_a_cpu_hierarchy_still_limits_memory(tmp_path: Path) -> None:
    """No cpu hierarchy mounted: memory and pids groups only (and a warning)."""
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("max")
    group = cgroups.create("vm6", 512 << 20, 64, root=tmp_path, cpu=cgroups.CpuQuota(1000))
    assert group is not None and len(group.dirs) == 2
