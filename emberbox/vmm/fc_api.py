"""Everything emberbox says to Firecracker, as pure functions (no I/O here).

* REST payloads for the API socket, built from typed values and checked in the tests
  against Firecracker's own Swagger description (``tests/unit/test_firecracker_contract.py``);
* the request sequences that boot and restore a VM (:func:`boot_requests`,
  :func:`restore_requests`), so the order is tested without a process;
* the host side of Firecracker's vsock ``CONNECT <port>`` handshake (:class:`VsockHandshake`);
* parsing of error bodies and of ``firecracker --version``.

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
ROOT_DRIVE_ID = "rootfs"
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


def root_drive_payload(path: str) -> JSON:
    # Writable: the path is the VM's own copy-on-write copy, never the image itself.
    return {
        "drive_id": ROOT_DRIVE_ID,
        "path_on_host": path,
        "is_root_device": True,
        "is_read_only": False,
    }


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


def boot_requests(plan: BootPlan) -> list[ApiRequest]:
    """Every call, in order, that turns a fresh process into a booting guest."""
    return [
        *observability_requests(plan.log_file, plan.metrics_file),
        ApiRequest("PUT", "/machine-config", machine_config_payload(plan.vcpus, plan.memory_mib)),
        ApiRequest(
            "PUT",
            "/boot-source",
            boot_source_payload(plan.kernel, plan.initrd, boot_args(plan.kernel_args)),
        ),
        ApiRequest("PUT", f"/drives/{ROOT_DRIVE_ID}", root_drive_payload(plan.rootfs)),
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
    """The VMMError for a non-2xx answer; Firecracker explains itself in ``fault_message``."""
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
    )


_VERSION = re.compile(r"Firecracker v?(\d+\.\d+\.\d+[\w.+-]*)")


def parse_version(output: str) -> str:
    """``1.16.1`` from ``firecracker --version`` output (``Firecracker v1.16.1`` + more)."""
    match = _VERSION.search(output)
    if match is None:
        first = output.strip().splitlines()[0] if output.strip() else "(no output)"
        raise VMMError(f"cannot read a Firecracker version from {first!r}")
    return match.group(1)


# --- vsock -----------------------------------------------------------------------------
# Firecracker proxies host-initiated vsock connections through a unix socket: the host
# writes "CONNECT <port>\n" and Firecracker answers "OK <host port>\n" once the guest
# accepted. If nobody listens on that guest port, Firecracker just closes the connection.


class VsockRefused(Exception):
    """The handshake did not end in ``OK`` (nobody listening yet, or not Firecracker)."""


@dataclass(frozen=True)
class VsockAccepted:
    host_port: int
    leftover: bytes  # bytes after the OK line: already the guest's stream


def connect_request(port: int) -> bytes:
    if not 0 < port < 1 << 32:
        raise ValueError(f"vsock port {port} out of range")
    return f"CONNECT {port}\n".encode("ascii")


class VsockHandshake:
    """Incremental parser of Firecracker's answer to ``CONNECT``.

    Feed it what the socket returns, in pieces of any size. It answers None while the
    line is incomplete, a :class:`VsockAccepted` once ``OK <n>\\n`` arrived (with any bytes
    that followed it), and raises :class:`VsockRefused` for anything else.
    """

    MAX_LINE = 64  # "OK 4294967295\n" is 14 bytes; more without a newline is not Firecracker

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> VsockAccepted | None:
        self._buf += data
        line, sep, rest = self._buf.partition(b"\n")
        if not sep:
            if len(self._buf) > self.MAX_LINE or not b"OK ".startswith(self._buf[:3]):
                raise VsockRefused(f"unexpected answer to CONNECT: {self._buf[:80]!r}")
            return None
        words = line.split()
        if len(words) != 2 or words[0] != b"OK" or not words[1].isdigit():
            raise VsockRefused(f"unexpected answer to CONNECT: {line[:80]!r}")
        return VsockAccepted(int(words[1]), rest)

    def eof(self) -> VsockRefused:
        """The error for a connection closed before the OK line (guest not listening)."""
        got = f" after {self._buf!r}" if self._buf else ""
        return VsockRefused(f"Firecracker closed the vsock connection{got}: agent not listening")
