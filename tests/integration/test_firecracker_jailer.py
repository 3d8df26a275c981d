"""The jailer path against the real binaries in ../shared/firecracker/bin (issue #15).

Everything up to the guest boot is real there: the jailer builds the chroot, the cgroup
and the uid switch, Firecracker starts in it and takes its configuration. A guest never
boots on these hosts' nested KVM, so once the jail is checked and torn down the test
is skipped with that reason: the boot itself is not proven here, never a pass.
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
from emberbox.vmm.firecracker.driver import FirecrackerDriver
from emberbox.vmm.firecracker.jailer import JailerConfig
from tests.support.paths import REPO

BIN = REPO.parent / "shared" / "firecracker" / "bin"
JAIL_UID = 64123
pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(
        not (BIN / "jailer").exists() or os.geteuid() != 0 or not os.path.exists("/dev/kvm"),
        reason=f"needs root, /dev/kvm and the release binaries in {BIN}",
    ),
]


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fcj", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _status(pid: int, field: str) -> list[str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return next(line for line in lines if line.startswith(field + ":")).split()[1:]


def _gone(pid: int) -> bool:
    """No such process, or only its zombie (the jailer that forked it has exited, so it
    is reaped by whoever adopted it, not by us)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


def _memory_limit(pid: int, jail: JailerConfig) -> int:
    """The memory limit of the cgroup ``pid`` is in (v2, or v1's memory controller)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if jail.cgroup_version == 2 and controllers == "":
            return int((jail.cgroup_root / path.lstrip("/") / "memory.max").read_text())
        if jail.cgroup_version == 1 and "memory" in controllers.split(","):
            limit = jail.cgroup_root / "memory" / path.lstrip("/") / "memory.limit_in_bytes"
            return int(limit.read_text())
    raise AssertionError(f"process {pid} is in no memory cgroup")


def test_the_real_jailer_confines_firecracker(short_tmp: Path, default_image: ImageInfo) -> None:
    """Firecracker runs in the jail's chroot, as the jail's uid and gid, in a cgroup of
    its own with the VM's memory limit; kill removes the jail and leaves no process."""
    jail = JailerConfig(
        exec_file=BIN / "firecracker",
        uid=JAIL_UID,
        gid=JAIL_UID,
        jailer_binary=str(BIN / "jailer"),
        chroot_base_dir=short_tmp / "j",
        cgroup_version=cgroups.version() or 2,
    )
    config = VMConfig(
        vm_id="soakjail1",
        work_dir=short_tmp / "vms" / "vm",
        guest=default_image.files,
        vcpus=1,
        memory_mib=256,
    )
    jail_dir = short_tmp / "j" / "firecracker" / config.vm_id

    async def run() -> tuple[int, str]:
        vm = await FirecrackerDriver(jailer=jail, socket_timeout_s=20).start(config)
        pid = vm.pid
        assert pid is not None
        try:
            assert _status(pid, "Uid") == [str(JAIL_UID)] * 4
            assert _status(pid, "Gid") == [str(JAIL_UID)] * 4
            chroot = await asyncio.to_thread(
                os.path.samefile, f"/proc/{pid}/root", jail_dir / "root"
            )
            assert chroot
            assert (
                await asyncio.to_thread(_memory_limit, pid, jail)
                == (256 + jail.memory_overhead_mib) << 20
            )
            try:
                await vm.open_agent_stream(timeout_s=15)
                outcome = "booted"
            except (errors.VMMError, errors.AgentError, OSError, TimeoutError) as exc:
                outcome = f"the guest did not boot: {type(exc).__name__}"
        finally:
            await vm.kill()
        await asyncio.sleep(0.5)
        return pid, outcome

    pid, outcome = asyncio.run(run())
    assert _gone(pid)
    assert not jail_dir.exists()
    if outcome != "booted":
        pytest.skip(f"jail checked and torn down; {outcome} (nested KVM here, see README)")
