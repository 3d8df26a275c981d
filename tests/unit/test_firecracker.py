"""Firecracker driver parts without a VMM: payloads, boot args, errors, files, processes."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from emberbox.errors import HostError, InvalidRequest, SnapshotCorrupt, SnapshotMismatch, VMMError
from emberbox.vmm.base import BootFiles, Driver, SnapshotFiles, VMConfig
from emberbox.vmm.firecracker import api as fc_api
from emberbox.vmm.firecracker import client as fc_client
from emberbox.vmm.firecracker.api import ApiRequest, BootPlan
from emberbox.vmm.firecracker.client import ApiClient
from emberbox.vmm.firecracker.driver import FirecrackerDriver, firecracker_usable
from emberbox.vmm.firecracker.files import clone_file
from emberbox.vmm.firecracker.process import cmdline_matches, read_tail, trim_log
from tests.support.fakes_vmm import LiveProcess


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _config(work_dir: Path) -> VMConfig:
    img = Path("/nonexistent")
    return VMConfig("vm1", work_dir, BootFiles(img / "k", img / "v", img / "i", img / "r"))


def test_driver_satisfies_the_interface() -> None:
    """FirecrackerDriver is a Driver named "firecracker"."""
    driver: Driver = FirecrackerDriver()
    assert driver.name == "firecracker"


def test_boot_args_put_ours_before_the_callers() -> None:
    """Fixed Firecracker args, then the vsock transport marker, then the config's args."""
    assert fc_api.boot_args(("quiet", "init=/sbin/agent")) == (
        "console=ttyS0 reboot=k panic=1 pci=off emberbox.transport=vsock quiet init=/sbin/agent"
    )


def test_boot_plan_becomes_the_ordered_requests() -> None:
    """Logger and metrics first, InstanceStart last, each payload from the plan."""
    plan = BootPlan(2, 1024, "/img/vmlinux", "/img/initrd", "rootfs.ext4", "vsock.sock", "l", "m")
    requests = fc_api.boot_requests(plan)
    assert [r.path for r in requests] == [
        "/logger",
        "/metrics",
        "/machine-config",
        "/boot-source",
        "/drives/rootfs",
        "/vsock",
        "/entropy",
        "/actions",
    ]
    assert requests[2].body == {"vcpu_count": 2, "mem_size_mib": 1024}
    assert requests[3].body == {
        "kernel_image_path": "/img/vmlinux",
        "initrd_path": "/img/initrd",
        "boot_args": fc_api.boot_args(),
    }
    assert requests[4].body == {
        "drive_id": "rootfs",
        "path_on_host": "rootfs.ext4",
        "is_root_device": True,
        "is_read_only": False,
    }
    assert requests[5].body == {"guest_cid": 3, "uds_path": "vsock.sock"}
    assert requests[-1].body == {"action_type": "InstanceStart"}


def test_restore_loads_from_a_file_and_resumes() -> None:
    """A restore configures only logger and metrics, then loads and resumes in one call."""
    requests = fc_api.restore_requests("l", "m", "/s/vmstate", "/s/memory")
    assert [r.path for r in requests] == ["/logger", "/metrics", "/snapshot/load"]
    assert requests[-1].body == {
        "snapshot_path": "/s/vmstate",
        "mem_backend": {"backend_type": "File", "backend_path": "/s/memory"},
        "resume_vm": True,
    }


def test_snapshot_and_state_payloads() -> None:
    """Snapshots are Full; pause and resume are PATCH /vm states."""
    assert fc_api.snapshot_create_payload("d/vmstate", "d/memory") == {
        "snapshot_type": "Full",
        "snapshot_path": "d/vmstate",
        "mem_file_path": "d/memory",
    }
    assert fc_api.vm_state_payload("Paused") == {"state": "Paused"}


@pytest.mark.parametrize("vcpus", [0, 33])
def test_vcpu_counts_firecracker_refuses_are_invalid_requests(vcpus: int) -> None:
    """Out-of-range vCPU counts fail before any process starts."""
    with pytest.raises(InvalidRequest):
        fc_api.machine_config_payload(vcpus, 512)


def test_reserved_vsock_cids_are_refused() -> None:
    """CIDs 0-2 are reserved by vsock."""
    with pytest.raises(InvalidRequest):
        fc_api.vsock_payload(2, "v.sock")


def test_fault_message_becomes_the_error_message() -> None:
    """A Firecracker error body maps to VMMError naming the call, status and fault."""
    req = ApiRequest("PUT", "/boot-source", {})
    err = fc_api.api_error(400, b'{"fault_message": "Kernel not found"}', req, "tail")
    assert isinstance(err, VMMError)
    assert err.message == "Firecracker refused PUT /boot-source (HTTP 400): Kernel not found"
    assert err.console_tail == "tail" and err.details["status"] == 400
    assert err.details["fault"] == "Kernel not found"  # the reason alone, for rewording


@pytest.mark.parametrize(
    ("body", "reason"),
    [(b"", "(empty body)"), (b"upstream broke", "upstream broke"), (b'{"x": 1}', '{"x": 1}')],
)
def test_error_bodies_without_fault_message_are_kept_verbatim(body: bytes, reason: str) -> None:
    """Bodies that are not Firecracker's error shape still explain the failure."""
    err = fc_api.api_error(500, body, ApiRequest("PATCH", "/vm"))
    assert err.message.endswith(f"(HTTP 500): {reason}")


def test_version_is_parsed_from_the_first_line() -> None:
    """``firecracker --version`` prints more than the version; only the number is kept."""
    out = "Firecracker v1.16.1\n\nSupported snapshot data format versions: 8.0.0\n"
    assert fc_api.parse_version(out) == "1.16.1"
    assert fc_api.parse_version("Firecracker v1.10.0-dev\n") == "1.10.0-dev"
    with pytest.raises(VMMError, match="cannot read"):
        fc_api.parse_version("qemu 8.2\n")


def test_version_runs_the_binary(tmp_path: Path) -> None:
    """version() asks the configured binary; a missing binary is a HostError."""
    fake = tmp_path / "firecracker"
    fake.write_text("#!/bin/sh\necho 'Firecracker v1.16.1'\n")
    fake.chmod(0o755)
    assert FirecrackerDriver(str(fake)).version() == "1.16.1"
    with pytest.raises(HostError):
        FirecrackerDriver(str(tmp_path / "missing")).version()


@pytest.mark.parametrize(
    ("argv", "jail_id", "expected"),
    [
        (["/usr/bin/firecracker", "--api-sock", "/w/fc.sock"], None, True),
        (["/usr/bin/firecracker", "--api-sock=/w/fc.sock"], None, True),
        (["/usr/bin/python3", "/opt/firecracker", "--api-sock", "/w/fc.sock"], None, True),
        (["/usr/bin/firecracker", "--api-sock", "/other/fc.sock"], None, False),
        (["/usr/bin/sleep", "--api-sock", "/w/fc.sock"], None, False),
        (["./firecracker", "--id=vm-1", "--api-sock", "/w/fc.sock"], "vm-1", True),
        (["./firecracker", "--id=vm-2", "--api-sock", "/w/fc.sock"], "vm-1", False),
        ([], None, False),
    ],
)
def test_cmdline_identifies_the_vms_own_process(
    argv: list[str], jail_id: str | None, expected: bool
) -> None:
    """Only a Firecracker serving this VM's socket (and jail id) is re-adopted."""
    assert cmdline_matches(argv, "/w/fc.sock", jail_id) is expected


def test_clone_is_sparse_private_and_leaves_the_source_alone(tmp_path: Path) -> None:
    """The copy has the same bytes, holes where the source is zero, mode 0600."""
    src = tmp_path / "rootfs.ext4"
    data = b"head" + bytes(4 << 20) + b"tail"
    src.write_bytes(data)
    src.chmod(0o444)
    dest = tmp_path / "copy.ext4"
    dest.write_bytes(b"stale from an earlier try")
    clone_file(src, dest)
    assert dest.read_bytes() == data
    assert dest.stat().st_blocks * 512 < 1 << 20  # the 4 MiB of zeros are not allocated
    assert oct(dest.stat().st_mode & 0o777) == "0o600"
    assert src.read_bytes() == data


def test_clone_of_an_all_zero_tail_keeps_the_size(tmp_path: Path) -> None:
    """A source ending in zeros (a hole in the copy) keeps its full length."""
    src = tmp_path / "disk"
    src.write_bytes(b"x" + bytes(100_000))
    clone_file(src, tmp_path / "copy")
    assert (tmp_path / "copy").stat().st_size == 100_001


def test_console_tail_and_trim(tmp_path: Path) -> None:
    """The tail is the last bytes, decoded leniently; trimming keeps the newest half."""
    log = tmp_path / "console.log"
    assert read_tail(log, 10) == ""
    log.write_bytes(b"old " * 1000 + b"\xffnewest")
    assert read_tail(log, 7).endswith("newest")
    trim_log(log, 1000)
    kept = log.read_bytes()
    assert kept.startswith(b"[... older console output trimmed ...]") and kept.endswith(b"newest")
    assert len(kept) < 1000
    trim_log(log, 1000)
    assert log.read_bytes() == kept  # under the cap: untouched


def test_usable_reports_a_missing_binary(tmp_path: Path) -> None:
    """Without the binary, firecracker_usable says so (the integration suite skips on it)."""
    usable, reason = firecracker_usable(str(tmp_path / "firecracker"))
    assert not usable and "no Firecracker binary" in reason


def test_usable_checks_kvm_when_the_binary_exists(tmp_path: Path) -> None:
    """With a binary present the answer depends on /dev/kvm, and the reason says which."""
    fake = tmp_path / "firecracker"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    usable, reason = firecracker_usable(str(fake))
    assert usable == os.access("/dev/kvm", os.R_OK | os.W_OK)
    assert ("/dev/kvm" in reason) or usable


@pytest.mark.anyio
async def test_restore_refuses_another_vmms_snapshot(tmp_path: Path) -> None:
    """A QEMU snapshot cannot be loaded by Firecracker."""
    snap = SnapshotFiles(tmp_path, "qemu", "8.2.0")
    with pytest.raises(SnapshotMismatch, match="qemu"):
        await FirecrackerDriver().restore(_config(tmp_path / "vm"), snap)


def _fake_firecracker(directory: Path) -> str:
    fake = directory / "firecracker"
    fake.write_text("#!/bin/sh\necho 'Firecracker v1.16.1'\n")
    fake.chmod(0o755)
    return str(fake)


def _snapshot_dir(directory: Path, without: str) -> SnapshotFiles:
    directory.mkdir()
    for name in {"vmstate", "memory", "rootfs.ext4"} - {without}:
        (directory / name).write_bytes(b"x")
    return SnapshotFiles(directory, "firecracker", "1.16.1")


@pytest.mark.anyio
async def test_restore_refuses_another_versions_snapshot(tmp_path: Path) -> None:
    """A snapshot from another Firecracker version is a SnapshotMismatch naming both."""
    snap = SnapshotFiles(tmp_path, "firecracker", "1.15.0")
    driver = FirecrackerDriver(_fake_firecracker(tmp_path))
    with pytest.raises(
        SnapshotMismatch, match=r"Firecracker 1\.15\.0; this is Firecracker 1\.16\.1"
    ):
        await driver.restore(_config(tmp_path / "vm"), snap)


@pytest.mark.anyio
@pytest.mark.parametrize("missing", ["vmstate", "memory", "rootfs.ext4"])
async def test_restore_names_a_missing_snapshot_file(tmp_path: Path, missing: str) -> None:
    """Each missing snapshot file is SnapshotCorrupt naming it (as QEMU's driver does)."""
    snap = _snapshot_dir(tmp_path / "snap", without=missing)
    config = _config(tmp_path / "vm")
    with pytest.raises(SnapshotCorrupt) as caught:
        await FirecrackerDriver(_fake_firecracker(tmp_path)).restore(config, snap)
    path = snap.directory / missing
    assert caught.value.message == f"snapshot file {path} is missing"
    assert caught.value.details == {"file": str(path)}
    assert not config.work_dir.exists()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory short enough for unix socket paths."""
    path = Path(tempfile.mkdtemp(prefix="fc", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.anyio
async def test_load_that_times_out_with_a_live_vmm_is_not_called_corrupt(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No answer and no exit says nothing about the snapshot: a plain VMMError, not Corrupt."""
    monkeypatch.setattr(fc_client, "LOAD_EXIT_GRACE_S", 0.05)

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up and closes
        writer.close()

    sock = short_dir / "api.sock"
    server = await asyncio.start_unix_server(never_answer, path=str(sock))
    client = ApiClient(sock, LiveProcess(), lambda: "tail", timeout_s=5)
    req = fc_api.restore_requests("l", "m", "vmstate", "memory")[-1]
    async with server:
        with pytest.raises(VMMError, match="PUT /snapshot/load failed") as caught:
            await client.load_snapshot(req, short_dir / "vmstate", timeout_s=0.1)
        await client.aclose()
    assert not isinstance(caught.value, SnapshotCorrupt)


@pytest.mark.anyio
async def test_socket_paths_too_long_fail_before_spawning(tmp_path: Path) -> None:
    """A work dir whose socket path would not fit in sun_path is a HostError, not a hang."""
    with pytest.raises(HostError, match="too long"):
        await FirecrackerDriver().attach(_config(tmp_path / ("d" * 120)), os.getpid())


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


_SPAWN_THEN_EXIT = """
import sys
from pathlib import Path
from emberbox.vmm.firecracker.process import spawn
child = spawn(["sleep", "30"], Path(sys.argv[1]), Path(sys.argv[1]) / "console.log",
              die_with_parent=sys.argv[2] == "ephemeral")
print(child.pid, flush=True)
"""


@pytest.mark.parametrize("lifetime", ["ephemeral", "detached"])
def test_ephemeral_vmm_dies_with_its_parent(tmp_path: Path, lifetime: str) -> None:
    """An ephemeral VMM gets SIGKILL when the process that spawned it exits; detached lives on."""
    out = subprocess.run(
        [sys.executable, "-c", _SPAWN_THEN_EXIT, str(tmp_path), lifetime],
        capture_output=True,
        check=True,
        text=True,
    )
    pid = int(out.stdout)
    # Death is prompt once it comes; a detached VMM gets a grace period to prove it stays.
    deadline = time.monotonic() + (5 if lifetime == "ephemeral" else 0.3)
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        assert _alive(pid) is (lifetime == "detached")
    finally:
        if _alive(pid):
            os.kill(pid, 9)
