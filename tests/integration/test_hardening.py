"""Host hardening with real VMs: QEMU's user, its files, private sockets, CPU quota, disk cap."""

from __future__ import annotations

import asyncio
import os
import pwd
import stat
import subprocess
import time
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path

import pytest

from emberbox.agent_client.spec import ExecSpec
from emberbox.config import Settings
from emberbox.errors import QuotaExceeded
from emberbox.images.registry import ImageRegistry
from emberbox.service.sandboxes.manager import SandboxManager
from emberbox.service.vm.machine import SandboxVM
from emberbox.vmm import cgroups
from emberbox.vmm.qemu import qcow2
from emberbox.vmm.qemu.driver import HostLimits, QemuDriver
from emberbox.vmm.select import choose_driver
from tests.support.paths import qemu_pids_under

pytestmark = [
    pytest.mark.vm,
    pytest.mark.anyio,
    pytest.mark.skipif(os.geteuid() != 0, reason="QEMU drops to the VMM user only from root"),
]
Factory = Callable[..., Awaitable[SandboxVM]]
QCOW2_METADATA_BYTES = 32 << 20  # L1/L2 and refcount tables of a 2 GiB image: ~1 MiB


@pytest.fixture
def qemu_settings(settings: Settings) -> Settings:
    if settings.vmm != "qemu":
        pytest.skip("QEMU driver hardening (Firecracker has its jailer)")
    return settings


def status_ids(pid: int) -> dict[str, list[int]]:
    """Uid, Gid and Groups of ``pid`` from /proc/PID/status."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            found[key] = [int(v) for v in value.split()]
    return found


def open_files(pid: int) -> dict[int, str]:
    fds = Path(f"/proc/{pid}/fd")
    return {int(fd.name): os.readlink(fd) for fd in fds.iterdir()}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def check_qemu_is_confined(
    settings: Settings, pid: int, work_dir: Path, more: Collection[Path] = ()
) -> None:
    """QEMU's uids and gids are all the VMM user's (no root groups); every file it holds
    under the data and cache dirs is one the host handed over; it cannot open its own
    overlay by path."""
    user = pwd.getpwnam(settings.vmm_user)
    ids = status_ids(pid)
    assert ids["Uid"] == [user.pw_uid] * 4 and ids["Gid"] == [user.pw_gid] * 4
    assert 0 not in ids["Groups"]
    overlay = work_dir / "overlay.qcow2"
    image = ImageRegistry(settings).get(settings.default_image).files
    handed = {layer.path for layer in qcow2.backing_chain(overlay)} | set(more)
    handed |= {image.kernel, image.initrd, work_dir / "qemu.log"}
    expected = {str(path.resolve()) for path in handed}
    roots = [str(d.resolve()) for d in (settings.data_dir, settings.cache_dir)]
    under = {t for t in open_files(pid).values() if any(t.startswith(r) for r in roots)}
    assert str(overlay.resolve()) in under
    assert under <= expected, f"QEMU holds files it was not given: {under - expected}"
    assert stat.S_IMODE(overlay.stat().st_mode) == 0o600
    # Neither by path nor through QEMU's own descriptor in /proc (which another QEMU of
    # the same user could reach): re-opening checks the file's mode, root's 0600.
    fd = min(n for n, target in open_files(pid).items() if target == str(overlay.resolve()))
    for path in (str(overlay), f"/proc/{pid}/fd/{fd}"):
        cat = await asyncio.create_subprocess_exec(
            *("/bin/cat", path),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            user=user.pw_uid,
            group=user.pw_gid,
            extra_groups=[],
        )
        _, err = await cat.communicate()
        assert cat.returncode != 0 and b"Permission denied" in err, path


async def test_a_cold_booted_qemu_runs_as_the_vmm_user_with_only_its_files(
    sandbox_factory: Factory, qemu_settings: Settings
) -> None:
    """A cold boot: QEMU is the VMM user's and holds only what it was handed."""
    sb = await sandbox_factory()
    assert sb.pid is not None
    await check_qemu_is_confined(qemu_settings, sb.pid, sb.work_dir)


async def test_a_template_clone_gets_its_ram_file_and_disk_chain_as_fds(
    qemu_settings: Settings,
) -> None:
    """A template clone also holds the template's RAM file (the VMM user's, 0600: QEMU
    7.2 opens it read-write) and the template disk, read-only, and nothing else."""
    async with SandboxManager(qemu_settings) as manager:
        record = await manager.create()
        pid = (await manager.get(record.id)).vmm_pid
        assert pid is not None
        memory = {Path(t) for t in open_files(pid).values() if t.endswith("/memory")}
        assert len(memory) == 1 and memory <= {
            p.resolve() for p in qemu_settings.templates_dir.glob("*/*/memory")
        }
        info = next(iter(memory)).stat()
        assert info.st_uid == pwd.getpwnam(qemu_settings.vmm_user).pw_uid
        assert stat.S_IMODE(info.st_mode) == 0o600
        await check_qemu_is_confined(qemu_settings, pid, qemu_settings.vms_dir / record.id, memory)
        await manager.kill(record.id)


async def test_sockets_are_private_to_the_host(
    sandbox_factory: Factory, qemu_settings: Settings
) -> None:
    """The work dir is root's and 0700; QMP, agent and console sockets are 0600; QEMU
    got them as listening fds and the guest answers through them."""
    sb = await sandbox_factory()
    info = sb.work_dir.stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (os.geteuid(), 0o700)
    for name in ("qmp.sock", "agent.sock", "console.sock"):
        mode = (sb.work_dir / name).stat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600, name
    assert (await sb.agent.exec(ExecSpec(["echo", "hi"]))).stdout == b"hi\n"


async def test_cpu_quota_holds_a_spinning_guest(qemu_settings: Settings) -> None:
    """QEMU's cgroup gets (vCPUs + overhead) CPUs; with a quota below what a spinning
    guest takes, QEMU's measured CPU use over 3 s stays within it; the group goes with
    the VM."""
    info = ImageRegistry(qemu_settings).get(qemu_settings.default_image)
    driver = choose_driver(qemu_settings, info.files).driver
    assert isinstance(driver, QemuDriver) and driver.limits is not None
    assert driver.limits.cpu_quota_us(1) == round((1 + qemu_settings.vmm_cpu_overhead) * 1e5)
    driver.limits = HostLimits(cpu_overhead=-0.6)  # 0.4 CPU for one spinning vCPU
    sb = await SandboxVM.start(qemu_settings, vcpus=1, driver=driver)
    try:
        assert sb.pid is not None
        group = cgroups.existing(sb.id)
        assert group is not None
        cpu_dir = next(d for d in group.dirs if (d / "cpu.stat").exists())
        spinner = ExecSpec("timeout 8 sh -c 'while :; do :; done'; true")
        spin = asyncio.ensure_future(sb.agent.exec(spinner))
        await asyncio.sleep(1.5)
        before, started = cpu_seconds(sb.pid), time.monotonic()
        await asyncio.sleep(3)
        used = (cpu_seconds(sb.pid) - before) / (time.monotonic() - started)
        print(f"QEMU used {used:.2f} CPUs under a 0.40 CPU quota")
        assert 0.2 < used <= 0.4 + 0.08
        throttled = dict(line.split() for line in (cpu_dir / "cpu.stat").read_text().splitlines())
        assert int(throttled["nr_throttled"]) > 0
        await asyncio.wait_for(spin, 60)
    finally:
        await sb.kill()
    assert cgroups.existing(sb.id) is None


async def test_a_guest_filling_its_disk_gets_enospc_and_the_host_does_not(
    sandbox_factory: Factory, qemu_settings: Settings
) -> None:
    """dd until the guest disk is full: ENOSPC in the guest, the overlay on the host stays
    within its virtual size (the cap) plus qcow2 metadata, and everything works after."""
    sb = await sandbox_factory()
    overlay = sb.work_dir / "overlay.qcow2"
    cap = qcow2.read_header(overlay).virtual_size
    started = time.monotonic()
    fill = ExecSpec(
        "dd if=/dev/zero of=/var/tmp/fill bs=1M oflag=direct 2>&1; df -m / | tail -1",
        timeout_s=240,
    )
    result = await sb.agent.exec(fill)
    elapsed = time.monotonic() - started
    size = overlay.stat()
    used = max(size.st_size, size.st_blocks * 512)
    print(f"filled in {elapsed:.1f} s; overlay {used >> 20} MiB for a {cap >> 20} MiB cap")
    assert b"No space left on device" in result.stdout
    assert used <= cap + QCOW2_METADATA_BYTES
    after = await sb.agent.exec(
        ExecSpec("rm /var/tmp/fill && echo ok > /var/tmp/x && cat /var/tmp/x")
    )
    assert after.stdout == b"ok\n"
    (qemu_settings.data_dir / "still-writable").write_text("yes")


async def test_a_disk_over_the_cap_is_refused_before_qemu_starts(qemu_settings: Settings) -> None:
    """max_disk_mib below the image's size: the sandbox is refused, nothing is left."""
    settings = qemu_settings.model_copy(update={"max_disk_mib": 1024})
    with pytest.raises(QuotaExceeded, match="over the 1024 MiB cap"):
        await SandboxVM.start(settings)
    assert qemu_pids_under(settings.data_dir) == []
    assert not settings.vms_dir.exists() or list(settings.vms_dir.iterdir()) == []
