"""Firecracker under hostile load (issue #15): its console file stays capped while
nobody reads it, and production mode refuses it without the jailer. No VM."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from emberbox.config import Settings
from emberbox.errors import HostError
from emberbox.vmm import select
from emberbox.vmm.firecracker import driver as fc_driver
from emberbox.vmm.firecracker import jailer
from emberbox.vmm.firecracker.files import Layout
from emberbox.vmm.firecracker.jailer import JailerConfig

CAP = 64 * 1024


class Running:
    """A VMM process that runs until killed."""

    pid = 4242

    def __init__(self) -> None:
        self.status: int | None = None

    def poll(self) -> int | None:
        return self.status

    def kill(self) -> None:
        self.status = -9


def test_the_console_is_trimmed_while_nobody_reads_it(tmp_path: Path) -> None:
    """A guest printing forever: the console file stays near its cap without any read
    of it (before, it was trimmed only when read, or by a wait() nobody called)."""

    async def main() -> int:
        layout = Layout(tmp_path, tmp_path, tmp_path / "api.sock", str(tmp_path / "api.sock"))
        process = Running()
        vm = fc_driver.FirecrackerVM(
            "vm",
            layout,
            process,
            base=None,
            version=lambda: "1.0",
            console_max_bytes=CAP,
            api_timeout_s=1.0,
            snapshot_timeout_s=1.0,
        )
        with layout.console.open("ab") as console:
            for _ in range(40):  # 40 x 64 KiB, a little at a time, as a chatty guest
                console.write(b"x" * CAP)
                console.flush()
                await asyncio.sleep(fc_driver.CONSOLE_TRIM_S / 10)
        await asyncio.sleep(fc_driver.CONSOLE_TRIM_S * 1.5)
        size = layout.console.stat().st_size
        assert vm.is_running()
        process.kill()
        await asyncio.sleep(fc_driver.CONSOLE_TRIM_S * 1.5)
        return size

    assert asyncio.run(main()) <= CAP


@pytest.fixture
def usable_firecracker(monkeypatch: pytest.MonkeyPatch) -> object:
    """Firecracker reported usable; its driver a marker (no binary needed)."""
    marker = object()
    monkeypatch.setattr(select, "firecracker_status", lambda settings: (True, "usable"))
    monkeypatch.setattr(select, "firecracker_driver", lambda settings: marker)
    return marker


def settings(tmp_path: Path, **fields: object) -> Settings:
    base = Settings(cache_dir=tmp_path, data_dir=tmp_path, accel="tcg", vmm_user="")
    return base.model_copy(update=fields)


def test_production_refuses_firecracker_without_the_jailer(
    tmp_path: Path, usable_firecracker: object, caplog: pytest.LogCaptureFixture
) -> None:
    """EMBERBOX_VMM=firecracker fails; `auto` passes it over (here to QEMU TCG, which
    production refuses too); with the jailer, or in development, it is chosen."""
    production = settings(tmp_path, mode="production", vmm="firecracker")
    with pytest.raises(HostError, match="without the jailer"):
        select.choose_driver(production, None)
    caplog.set_level(logging.WARNING)
    with pytest.raises(HostError):
        select.choose_driver(production.model_copy(update={"vmm": "auto"}), None)
    assert "Firecracker passed over" in caplog.text
    jailed = production.model_copy(update={"firecracker_jailer": True})
    assert select.choose_driver(jailed, None).driver is usable_firecracker
    development = settings(tmp_path, vmm="firecracker")
    assert select.choose_driver(development, None).driver is usable_firecracker


def test_the_jailer_limits_follow_the_hosts_cgroup_version() -> None:
    """A cgroup v1 host gets v1 limit files (the real jailer 1.7 aborts with "Controller
    memory is unavailable" when told v2 there), one cgroup dir per limited controller."""
    v1 = JailerConfig(exec_file=Path("/bin/firecracker"), uid=1, gid=1, cgroup_version=1)
    argv = jailer.jailer_command(v1, "vm-1", vcpus=2, memory_mib=256)
    assert argv[argv.index("--cgroup-version") + 1] == "1"
    limits = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--cgroup"]
    assert limits == [
        f"memory.limit_in_bytes={(256 + 64) << 20}",
        "cpu.cfs_period_us=100000",
        "cpu.cfs_quota_us=200000",
    ]
    assert jailer.cgroup_dirs(v1, "vm-1") == [
        Path("/sys/fs/cgroup/memory/firecracker/vm-1"),
        Path("/sys/fs/cgroup/cpu/firecracker/vm-1"),
    ]
    v2 = JailerConfig(exec_file=Path("/bin/firecracker"), uid=1, gid=1)
    argv = jailer.jailer_command(v2, "vm-1", vcpus=2, memory_mib=256)
    assert [argv[i + 1] for i, arg in enumerate(argv) if arg == "--cgroup"] == [
        f"memory.max={(256 + 64) << 20}",
        "cpu.max=200000 100000",
    ]
