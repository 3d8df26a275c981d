"""The driver's lifecycle against the fake ``firecracker``: boot, pause, snapshot, restore,
attach, faults and the jailer, every request spec-valid."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from emberbox.errors import VMMCrashed, VMMError
from emberbox.vmm.base import BootFiles
from emberbox.vmm.firecracker.driver import FirecrackerDriver
from emberbox.vmm.firecracker.jailer import JailerConfig
from tests.support.fakes_firecracker import (
    FAKE_JAILER,
    fake_binary,
    recorded_requests,
    sha256_hex,
    vm_config,
    write_script,
)
from tests.support.firecracker_spec import SpecValidator, assert_valid, needs_spec


@needs_spec
@pytest.mark.anyio
async def test_full_lifecycle_speaks_the_spec(
    short_tmp: Path, record: Path, guest: BootFiles, validator: SpecValidator
) -> None:
    """Boot, pause, snapshot, resume, kill, restore elsewhere, agent stream: all spec-valid."""
    driver = FirecrackerDriver(str(fake_binary(short_tmp, record)))
    rootfs_digest = sha256_hex(guest.rootfs)
    source = vm_config(short_tmp, guest, "vm1", vcpus=2, memory_mib=256, kernel_args=("quiet",))
    vm = await driver.start(source)
    try:
        assert vm.is_running()
        # The image's rootfs itself, linked (not copied); the VM's own disk is the scratch.
        assert (source.work_dir / "rootfs.ext4").samefile(guest.rootfs)
        scratch = source.work_dir / "scratch.ext4"
        assert scratch.stat().st_blocks * 512 < 8 << 20 < scratch.stat().st_size
        assert oct(source.work_dir.stat().st_mode & 0o777) == "0o700"
        await vm.pause()
        await vm.resume()
        snap = await vm.snapshot(short_tmp / "snaps" / "s1")
        assert snap.vmm == "firecracker" and snap.vmm_version == "1.16.1"
        assert {p.name for p in snap.directory.iterdir()} == {
            "vmstate",
            "memory",
            "scratch.ext4",
            "base.json",
        }
        assert "guest booted" in vm.console_tail()
    finally:
        await vm.kill()
    assert not source.work_dir.exists()  # the restore below cannot lean on the old disk

    target = vm_config(short_tmp, guest, "vm2")
    restored = await driver.restore(target, snap)
    try:
        reader, writer = await restored.open_agent_stream(timeout_s=10)
        assert await reader.readexactly(20) == b"EB-first-agent-bytes"
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        writer.close()
        await writer.wait_closed()
    finally:
        await restored.kill()

    requests = recorded_requests(record)
    assert_valid(validator, requests)
    calls = [(r["method"], r["path"]) for r in requests]
    assert calls == [
        ("PUT", "/logger"),
        ("PUT", "/metrics"),
        ("PUT", "/machine-config"),
        ("PUT", "/boot-source"),
        ("PUT", "/drives/rootfs"),
        ("PUT", "/drives/scratch"),
        ("PUT", "/vsock"),
        ("PUT", "/entropy"),
        ("PUT", "/actions"),
        ("PATCH", "/vm"),
        ("PATCH", "/vm"),
        ("PATCH", "/vm"),
        ("PUT", "/snapshot/create"),
        ("PATCH", "/vm"),
        ("PUT", "/logger"),
        ("PUT", "/metrics"),
        ("PUT", "/snapshot/load"),
    ]
    bodies = {r["path"]: r["body"] for r in requests}
    assert bodies["/machine-config"] == {"vcpu_count": 2, "mem_size_mib": 256}
    boot_args = bodies["/boot-source"]["boot_args"]
    assert boot_args.endswith("emberbox.transport=vsock emberbox.overlay=/dev/vdb quiet")
    assert bodies["/drives/rootfs"]["path_on_host"] == "rootfs.ext4"  # relative: see module doc
    assert bodies["/drives/rootfs"]["is_read_only"] is True
    assert bodies["/drives/scratch"]["path_on_host"] == "scratch.ext4"
    assert bodies["/drives/scratch"]["is_read_only"] is False
    assert bodies["/snapshot/load"]["mem_backend"]["backend_type"] == "File"
    assert sha256_hex(guest.rootfs) == rootfs_digest


@pytest.mark.anyio
async def test_attach_readopts_a_running_firecracker(
    short_tmp: Path, record: Path, guest: BootFiles
) -> None:
    """A second driver (a restarted server) re-adopts the process by pid and can kill it."""
    binary = str(fake_binary(short_tmp, record))
    config = vm_config(short_tmp, guest, "vm1", lifetime="detached")
    first = await FirecrackerDriver(binary).start(config)
    try:
        assert first.pid is not None
        adopted = await FirecrackerDriver(binary).attach(config, first.pid)
        await adopted.pause()
        await adopted.kill()
        assert not adopted.is_running() and not config.work_dir.exists()
        await adopted.kill()  # idempotent
    finally:
        await first.kill()  # reaps our child; nothing left to remove
    assert recorded_requests(record)[-1]["body"] == {"state": "Paused"}


@pytest.mark.anyio
async def test_attach_refuses_a_process_that_is_not_this_vm(
    short_tmp: Path, record: Path, guest: BootFiles
) -> None:
    """A pid that belongs to another program (pid reuse) is not adopted."""
    binary = str(fake_binary(short_tmp, record))
    config = vm_config(short_tmp, guest, "vm1")
    with pytest.raises(VMMCrashed, match="not the Firecracker"):
        await FirecrackerDriver(binary).attach(config, os.getpid())


@pytest.mark.anyio
async def test_api_fault_becomes_vmm_error_and_cleans_up(
    short_tmp: Path, record: Path, guest: BootFiles
) -> None:
    """A 400 with fault_message surfaces as VMMError; the process and work dir are gone."""
    driver = FirecrackerDriver(str(fake_binary(short_tmp, record)))
    config = vm_config(short_tmp, guest, "vm1", memory_mib=8)
    with pytest.raises(VMMError, match="Invalid memory size") as caught:
        await driver.start(config)
    assert "PUT /machine-config (HTTP 400)" in caught.value.message
    assert "firecracker starting" in caught.value.console_tail
    assert not config.work_dir.exists()


@pytest.mark.anyio
async def test_process_dying_before_its_socket_is_a_crash(
    short_tmp: Path, record: Path, guest: BootFiles
) -> None:
    """Firecracker exiting at start raises VMMCrashed carrying its stderr."""
    driver = FirecrackerDriver(str(fake_binary(short_tmp, record, mode="crash")))
    with pytest.raises(VMMCrashed, match="exited") as caught:
        await driver.start(vm_config(short_tmp, guest, "vm1"))
    assert "cannot open /dev/kvm" in caught.value.console_tail


@needs_spec
@pytest.mark.anyio
async def test_jailer_mode_lifecycle(
    short_tmp: Path, record: Path, guest: BootFiles, validator: SpecValidator
) -> None:
    """Under a (fake) jailer: files placed in the jail, jail-relative paths, jail removed."""
    jail = JailerConfig(
        exec_file=fake_binary(short_tmp, record),
        uid=os.getuid(),
        gid=os.getgid(),
        jailer_binary=str(write_script(short_tmp / "bin" / "jailer", FAKE_JAILER)),
        chroot_base_dir=short_tmp / "j",
        cgroup_root=short_tmp / "cg",
    )
    driver = FirecrackerDriver(jailer=jail)
    root = short_tmp / "j" / "firecracker" / "vm1" / "root"
    vm = await driver.start(vm_config(short_tmp, guest, "vm1"))
    try:
        assert vm.pid == int((root / "firecracker.pid").read_text())
        assert {"vmlinux", "initrd", "rootfs.ext4", "scratch.ext4"} <= {
            p.name for p in root.iterdir()
        }
        assert (root / "rootfs.ext4").samefile(guest.rootfs)  # a hard link: no copy in jail
        snap = await vm.snapshot(short_tmp / "snaps" / "s1")
    finally:
        await vm.kill()
    assert not (short_tmp / "j" / "firecracker" / "vm1").exists()

    restored = await driver.restore(vm_config(short_tmp, guest, "vm2"), snap)
    try:
        reader, writer = await restored.open_agent_stream(timeout_s=10)
        assert await reader.readexactly(2) == b"EB"
        writer.close()
        await writer.wait_closed()
    finally:
        await restored.kill()

    requests = recorded_requests(record)
    assert_valid(validator, requests)
    bodies = {r["path"]: r["body"] for r in requests}
    assert bodies["/boot-source"]["kernel_image_path"] == "vmlinux"
    assert bodies["/snapshot/create"]["snapshot_path"] == "snapshot/vmstate"
    assert bodies["/snapshot/load"]["snapshot_path"] == "vmstate"


@pytest.mark.anyio
async def test_snapshot_of_a_paused_vm_leaves_it_paused(
    short_tmp: Path, record: Path, guest: BootFiles
) -> None:
    """snapshot() only resumes a VM it paused itself; wait() then reports the SIGKILL."""
    vm = await FirecrackerDriver(str(fake_binary(short_tmp, record))).start(
        vm_config(short_tmp, guest, "vm1")
    )
    try:
        await vm.pause()
        await vm.snapshot(short_tmp / "snap")
    finally:
        await vm.kill()
    assert await vm.wait() == -9
    states = [r["body"]["state"] for r in recorded_requests(record) if r["path"] == "/vm"]
    assert states == ["Paused"]
