"""Snapshot errors and stop against the fake ``firecracker``: refused or fatal loads,
missing files, snapshot(stop=True), failed saves and adopted disks."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from emberbox.errors import SnapshotCorrupt, SnapshotMismatch, VMMError
from emberbox.vmm.base import BootFiles
from emberbox.vmm.firecracker.driver import FirecrackerDriver
from tests.support.fakes_firecracker import (
    GOOD_VMSTATE,
    fake_binary,
    handmade_snapshot,
    is_alive,
    recorded_requests,
    sha256_hex,
    vm_config,
)
from tests.support.firecracker_spec import SpecValidator, assert_valid, needs_spec


@needs_spec
@pytest.mark.anyio
async def test_refused_snapshot_load_is_corrupt_and_cleans_up(
    short_tmp: Path, record: Path, guest: BootFiles, validator: SpecValidator
) -> None:
    """A load refused with a 400 fault is SnapshotCorrupt naming vmstate; the VM is gone."""
    snap = handmade_snapshot(short_tmp, b"\x00truncated")
    state = snap.directory.absolute() / "vmstate"
    config = vm_config(short_tmp, guest, "vm1")
    with pytest.raises(SnapshotCorrupt) as caught:
        await FirecrackerDriver(str(fake_binary(short_tmp, record))).restore(config, snap)
    err = caught.value
    assert err.message.startswith(f"could not load snapshot {state}: Load snapshot error: ")
    assert err.details["file"] == str(state)
    assert "firecracker starting" in err.console_tail
    requests = recorded_requests(record)
    assert_valid(validator, requests)
    assert requests[-1]["path"] == "/snapshot/load"
    assert not is_alive(requests[-1]["pid"]) and not config.work_dir.exists()
    assert state.read_bytes() == b"\x00truncated"  # the snapshot is left for the caller


@pytest.mark.anyio
async def test_vmm_dying_during_load_is_corrupt_and_cleans_up(
    short_tmp: Path, record: Path, guest: BootFiles
) -> None:
    """A Firecracker that exits while loading is SnapshotCorrupt with its exit and stderr."""
    snap = handmade_snapshot(short_tmp, GOOD_VMSTATE)
    driver = FirecrackerDriver(str(fake_binary(short_tmp, record, mode="die-on-load")))
    config = vm_config(short_tmp, guest, "vm1")
    with pytest.raises(SnapshotCorrupt, match=r"Firecracker exited \(status 134\)") as caught:
        await driver.restore(config, snap)
    state = snap.directory.absolute() / "vmstate"
    assert caught.value.message.startswith(f"could not load snapshot {state}: ")
    assert caught.value.details["file"] == str(state)
    assert "bad snapshot state, aborting" in caught.value.console_tail
    assert not is_alive(recorded_requests(record)[-1]["pid"]) and not config.work_dir.exists()


@pytest.mark.anyio
async def test_restore_of_a_snapshot_missing_a_file_starts_nothing(
    short_tmp: Path, record: Path, guest: BootFiles
) -> None:
    """A missing ``memory`` is SnapshotCorrupt naming it, before any process or file exists."""
    snap = handmade_snapshot(short_tmp, GOOD_VMSTATE)
    (snap.directory / "memory").unlink()
    config = vm_config(short_tmp, guest, "vm1")
    with pytest.raises(SnapshotCorrupt, match="is missing") as caught:
        await FirecrackerDriver(str(fake_binary(short_tmp, record))).restore(config, snap)
    assert caught.value.details["file"] == str(snap.directory.absolute() / "memory")
    assert recorded_requests(record) == [] and not config.work_dir.exists()


@pytest.mark.anyio
async def test_snapshot_with_stop_ends_the_vmm_and_keeps_dest(
    short_tmp: Path, record: Path, guest: BootFiles
) -> None:
    """snapshot(stop=True) kills the VMM, removes its work dir and leaves a loadable dest."""
    driver = FirecrackerDriver(str(fake_binary(short_tmp, record)))
    config = vm_config(short_tmp, guest, "vm1")
    vm = await driver.start(config)
    try:
        pid = vm.pid
        assert pid is not None
        snap = await vm.snapshot(short_tmp / "snaps" / "paused", stop=True)
        assert not vm.is_running() and not is_alive(pid) and not config.work_dir.exists()
    finally:
        await vm.kill()  # idempotent: nothing left to do
    assert {p.name for p in snap.directory.iterdir()} == {
        "vmstate",
        "memory",
        "scratch.ext4",
        "base.json",
    }
    assert (snap.directory / "scratch.ext4").stat().st_size == 2048 << 20  # sparse, empty
    states = [r["body"]["state"] for r in recorded_requests(record) if r["path"] == "/vm"]
    assert states == ["Paused"]  # never resumed: the guest ran no further than the snapshot

    restored = await driver.restore(vm_config(short_tmp, guest, "vm2"), snap)
    await restored.kill()


@pytest.mark.anyio
async def test_failed_snapshot_with_stop_keeps_the_vm_running(
    short_tmp: Path, record: Path, guest: BootFiles
) -> None:
    """When the save fails, stop or not, dest is removed and the guest runs on."""
    driver = FirecrackerDriver(str(fake_binary(short_tmp, record, mode="snapshot-fails")))
    vm = await driver.start(vm_config(short_tmp, guest, "vm1"))
    try:
        with pytest.raises(VMMError, match="No space left on device"):
            await vm.snapshot(short_tmp / "snaps" / "s1", stop=True)
        assert vm.is_running() and not (short_tmp / "snaps" / "s1").exists()
    finally:
        await vm.kill()
    states = [r["body"]["state"] for r in recorded_requests(record) if r["path"] == "/vm"]
    assert states == ["Paused", "Resumed"]


@pytest.mark.anyio
async def test_restore_with_adopt_disk_copies_and_leaves_the_snapshot(
    short_tmp: Path, record: Path, guest: BootFiles
) -> None:
    """adopt_disk is safe to ignore: the VM gets its own disk, the snapshot stays whole."""
    snap = handmade_snapshot(short_tmp, GOOD_VMSTATE)
    before = {p.name: sha256_hex(p) for p in snap.directory.iterdir()}
    config = vm_config(short_tmp, guest, "vm1")
    vm = await FirecrackerDriver(str(fake_binary(short_tmp, record))).restore(
        config, snap, adopt_disk=True
    )
    try:
        disk = config.work_dir / "rootfs.ext4"
        assert disk.stat().st_nlink == 1  # a copy, not a link to the snapshot's disk
        assert {p.name: sha256_hex(p) for p in snap.directory.iterdir()} == before
        shutil.rmtree(snap.directory)  # what a caller that adopted the disk may do next
        reader, writer = await vm.open_agent_stream(timeout_s=10)
        assert await reader.readexactly(2) == b"EB"
        writer.close()
        await writer.wait_closed()
    finally:
        await vm.kill()
    assert not config.work_dir.exists()


@pytest.mark.anyio
async def test_restore_reattaches_the_base_and_copies_only_the_scratch(
    short_tmp: Path, record: Path, guest: BootFiles
) -> None:
    """A clone links the same rootfs and gets its own copy of the snapshot's scratch;
    over a rebuilt rootfs the restore is refused before any process starts."""
    driver = FirecrackerDriver(str(fake_binary(short_tmp, record)), scratch_mib=64)
    vm = await driver.start(vm_config(short_tmp, guest, "vm1"))
    try:
        snap = await vm.snapshot(short_tmp / "snaps" / "s1")
    finally:
        await vm.kill()
    config = vm_config(short_tmp, guest, "vm2")
    clone = await driver.restore(config, snap)
    try:
        assert (config.work_dir / "rootfs.ext4").samefile(guest.rootfs)
        scratch = config.work_dir / "scratch.ext4"
        assert not scratch.samefile(snap.directory / "scratch.ext4")
        assert sha256_hex(scratch) == sha256_hex(snap.directory / "scratch.ext4")
    finally:
        await clone.kill()

    os.utime(guest.rootfs, ns=(1, 1))  # the image was rebuilt since the snapshot
    calls = len(recorded_requests(record))
    with pytest.raises(SnapshotMismatch, match="rebuilt since"):
        await driver.restore(vm_config(short_tmp, guest, "vm3"), snap)
    assert len(recorded_requests(record)) == calls  # refused before any process
