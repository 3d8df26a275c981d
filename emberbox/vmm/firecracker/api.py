"""Everything emberbox says to Firecracker, as pure functions (no I/O here).

* REST payloads for the API socket, built from typed values and checked in the tests
  against Firecracker's own Swagger description (``tests/unit/firecracker_contract/``);
* the request sequences that boot and restore a VM (:func:`boot_requests`,
  :func:`restore_requests`), so the order is tested without a process;
* parsing of error bodies and of ``firecracker --version``.

The vsock ``CONNECT <port>`` handshake is in :mod:`emberbox.vmm.firecracker.vsock`.

Paths in payloads are strings *as Firecracker sees them*: relative to its working
directory (which is the jail root under the jailer) wherever the path ends up recorded in a
snapshot, so that a snapshot can be loaded by a process running somewhere else.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from emberbox.errors import InvalidRequest, VMMError

JSON = dict[str, Any]
VmState = Literal["Paused", "Resumed"]

# console=ttyS0: the serial console is the process's stdout, our only boot log.
# reboot=k panic=1: a guest reboot or panic ends the Firecracker process instead of hanging.
# pci=off: Firecracker has no PCI bus; probing it only costs boot time.
BASE_BOOT_ARGS = ("console=ttyS0", "reboot=k", "panic=1", "pci=off")
TRANSPORT_BOOT_ARG = "emberbox.transport=vsock"
# The initramfs's init (emberbox/images/initramfs.py) reads this flag: mount the root disk
# read-only, the scratch disk named here writable, an overlayfs of the two, and boot it.
OVERLAY_BOOT_ARG = "emberbox.overlay"
ROOT_DRIVE_ID = "rootfs"
SCRATCH_DRIVE_ID = "scratch"
SCRATCH_DEVICE = "/dev/vdb"  # the root device is always vda, the next drive vdb
MAX_VCPUS = 32  # MachineConfiguration.vcpu_count maximum in the API


@dataclass(frozen=True)
class ApiRequest:
    """One call on the API socket."""

    method: Literal["GET", "PUT", "PATCH"]
    path: str
    body: JSON | None = None


@dataclass(frozen=True)
class BootPlan:
    """What to configure before ``InstanceStart``; every path as Firecracker sees it."""

    vcpus: int
    memory_mib: int
    kernel: str
    initrd: str
    rootfs: str
    vsock_uds: str
    log_file: str
    metrics_file: str
    kernel_args: tuple[str, ...] = ()
    guest_cid: int = 3
    # The VM's writable layer over the read-only ``rootfs``; None: ``rootfs`` is the VM's
    # own writable disk (snapshots written before the overlay, loaded as they were made).
    scratch: str | None = None


def boot_args(extra: tuple[str, ...] = ()) -> str:
    """The guest kernel command line: fixed Firecracker arguments, then the caller's."""
    return " ".join((*BASE_BOOT_ARGS, TRANSPORT_BOOT_ARG, *extra))


def logger_payload(log_path: str, level: str = "Info") -> JSON:
    return {"log_path": log_path, "level": level, "show_level": True, "show_log_origin": False}


def metrics_payload(metrics_path: str) -> JSON:
    return {"metrics_path": metrics_path}


def machine_config_payload(vcpus: int, memory_mib: int) -> JSON:
    """Raises InvalidRequest for shapes Firecracker would refuse with a vaguer message."""
    if not 1 <= vcpus <= MAX_VCPUS:
        raise InvalidRequest(f"Firecracker supports 1 to {MAX_VCPUS} vCPUs, not {vcpus}")
    if memory_mib < 1:
        raise InvalidRequest(f"memory must be at least 1 MiB, not {memory_mib}")
    return {"vcpu_count": vcpus, "mem_size_mib": memory_mib}


def boot_source_payload(kernel: str, initrd: str, args: str) -> JSON:
    return {"kernel_image_path": kernel, "initrd_path": initrd, "boot_args": args}


def root_drive_payload(path: str, *, read_only: bool = True) -> JSON:
    # Read-only: the image's rootfs itself, shared by every VM (their writes go to scratch).
    return {
        "drive_id": ROOT_DRIVE_ID,
        "path_on_host": path,
        "is_root_device": True,
        "is_read_only": read_only,
    }


def scratch_drive_payload(path: str) -> JSON:
    """The VM's own writable disk: the overlay's upper layer (a small sparse ext4)."""
    return {
        "drive_id": SCRATCH_DRIVE_ID,
        "path_on_host": path,
        "is_root_device": False,
        "is_read_only": False,
    }


def overlay_args(scratch: str | None) -> tuple[str, ...]:
    """The kernel argument that turns the in-guest overlay on (none without scratch)."""
    return () if scratch is None else (f"{OVERLAY_BOOT_ARG}={SCRATCH_DEVICE}",)


def vsock_payload(guest_cid: int, uds_path: str) -> JSON:
    if guest_cid < 3:  # 0-2 are reserved (hypervisor, local, host)
        raise InvalidRequest(f"vsock guest CID must be 3 or more, not {guest_cid}")
    return {"guest_cid": guest_cid, "uds_path": uds_path}


def entropy_payload() -> JSON:
    # No rate limiter: the host's getrandom() does not deplete, so a greedy guest costs
    # only CPU time, which its cgroup already bounds.
    return {}


def action_payload(action: Literal["InstanceStart", "FlushMetrics", "SendCtrlAltDel"]) -> JSON:
    return {"action_type": action}


def vm_state_payload(state: VmState) -> JSON:
    return {"state": state}


def snapshot_create_payload(snapshot_path: str, mem_file_path: str) -> JSON:
    return {"snapshot_type": "Full", "snapshot_path": snapshot_path, "mem_file_path": mem_file_path}


def snapshot_load_payload(snapshot_path: str, mem_file_path: str, resume: bool = True) -> JSON:
    return {
        "snapshot_path": snapshot_path,
        "mem_backend": {"backend_type": "File", "backend_path": mem_file_path},
        "resume_vm": resume,
    }


def observability_requests(log_file: str, metrics_file: str) -> list[ApiRequest]:
    """Logger and metrics: the only resources allowed before a snapshot load, so first."""
    return [
        ApiRequest("PUT", "/logger", logger_payload(log_file)),
        ApiRequest("PUT", "/metrics", metrics_payload(metrics_file)),
    ]


def drive_requests(plan: BootPlan) -> list[ApiRequest]:
    """The root drive (read-only under a scratch drive), then the scratch drive."""
    root = root_drive_payload(plan.rootfs, read_only=plan.scratch is not None)
    requests = [ApiRequest("PUT", f"/drives/{ROOT_DRIVE_ID}", root)]
    if plan.scratch is not None:
        scratch = scratch_drive_payload(plan.scratch)
        requests.append(ApiRequest("PUT", f"/drives/{SCRATCH_DRIVE_ID}", scratch))
    return requests


def boot_requests(plan: BootPlan) -> list[ApiRequest]:
    """Every call, in order, that turns a fresh process into a booting guest."""
    args = boot_args((*overlay_args(plan.scratch), *plan.kernel_args))
    return [
        *observability_requests(plan.log_file, plan.metrics_file),
        ApiRequest("PUT", "/machine-config", machine_config_payload(plan.vcpus, plan.memory_mib)),
        ApiRequest("PUT", "/boot-source", boot_source_payload(plan.kernel, plan.initrd, args)),
        *drive_requests(plan),
        ApiRequest("PUT", "/vsock", vsock_payload(plan.guest_cid, plan.vsock_uds)),
        ApiRequest("PUT", "/entropy", entropy_payload()),
        ApiRequest("PUT", "/actions", action_payload("InstanceStart")),
    ]


def restore_requests(
    log_file: str, metrics_file: str, snapshot_path: str, mem_file_path: str
) -> list[ApiRequest]:
    """Every call, in order, that resumes a saved VM in a fresh process."""
    return [
        *observability_requests(log_file, metrics_file),
        ApiRequest("PUT", "/snapshot/load", snapshot_load_payload(snapshot_path, mem_file_path)),
    ]


def api_error(status: int, body: bytes, request: ApiRequest, console_tail: str = "") -> VMMError:
    """The VMMError for a non-2xx answer; Firecracker explains itself in ``fault_message``.

    ``details`` carry ``status``, ``path`` and ``fault`` (the reason alone, for callers
    that reword the error, such as a refused snapshot load).
    """
    text = body.decode("utf-8", errors="replace").strip()
    try:
        parsed = json.loads(text) if text else {}
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("fault_message"), str):
        reason = parsed["fault_message"]
    else:
        reason = text or "(empty body)"
    return VMMError(
        f"Firecracker refused {request.method} {request.path} (HTTP {status}): {reason}",
        console_tail,
        status=status,
        path=request.path,
        fault=reason,
    )


_VERSION = re.compile(r"Firecracker v?(\d+\.\d+\.\d+[\w.+-]*)")


def parse_version(output: str) -> str:
    """``1.16.1`` from ``firecracker --version`` output (``Firecracker v1.16.1`` + more)."""
    match = _VERSION.search(output)
    if match is None:
        first = output.strip().splitlines()[0] if output.strip() else "(no output)"
        raise VMMError(f"cannot read a Firecracker version from {first!r}")
    return match.group(1)
