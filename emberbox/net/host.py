"""Making and removing a sandbox's network on the host (root needed; blocking calls).

Per networked sandbox: a network namespace ``emberbox-<id>``, a veth pair (``ebh<id>``
on the host, ``veth0`` inside), a TAP device ``tap0`` inside, opened by us and passed
to QEMU as a descriptor (QEMU never enters the namespace and needs no privilege), and
the namespace's nftables table. On the host: one shared nftables table and the
``ip_forward`` sysctl (see emberbox/net/rules.py and docs/networking.md).

Everything here blocks: call it from a worker thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import logging
import os
import struct
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from emberbox.errors import HostError
from emberbox.net import plan as records
from emberbox.net import rules
from emberbox.net.addresses import (
    NS_VETH,
    TAP,
    Slot,
    host_veth_name,
    namespace_name,
)
from emberbox.net.plan import NetworkPlan

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
COMMAND_TIMEOUT_S = 30.0
NS_SYSCTLS = {  # written inside the namespace, before its interfaces exist
    "net/ipv4/ip_forward": "1",
    "net/ipv6/conf/all/disable_ipv6": "1",
    "net/ipv6/conf/default/disable_ipv6": "1",
}


@dataclass
class NetNamespace:
    """A sandbox's live network. ``tap_fd`` is ours until QEMU has its copy."""

    sandbox_id: str
    plan: NetworkPlan
    records_dir: Path
    tap_fd: int | None = None

    @property
    def name(self) -> str:
        return namespace_name(self.sandbox_id)

    def close_tap(self) -> None:
        """Drop our copy of the TAP descriptor: from now on it lives as long as QEMU."""
        fd, self.tap_fd = self.tap_fd, None
        if fd is not None:
            os.close(fd)

    def remove(self, *, keep_record: bool = False) -> None:
        """Remove the namespace, veth and rules (the VMM must be gone). Idempotent."""
        self.close_tap()
        remove(self.records_dir, self.sandbox_id, keep_record=keep_record)


def run(argv: list[str], stdin: str | None = None) -> str:
    """Run a host tool; HostError with its stderr when it fails."""
    try:
        proc = subprocess.run(
            argv, input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
        )
    except FileNotFoundError as exc:
        raise HostError(
            f"{argv[0]} not found: networking needs iproute2 and nftables "
            "(scripts/setup.sh installs them)"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise HostError(f"{' '.join(argv[:4])} did not finish in {COMMAND_TIMEOUT_S:g} s") from exc
    if proc.returncode != 0:
        raise HostError(f"{' '.join(argv[:4])} failed: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def host_addresses() -> list[str]:
    """Every address of the host's own interfaces (IPv4 and IPv6)."""
    found: set[str] = set()
    for link in json.loads(run(["ip", "-j", "address", "show"]) or "[]"):
        for info in link.get("addr_info", []):
            local = info.get("local")
            if isinstance(local, str) and local:
                found.add(local.split("%")[0])
    return sorted(found)


def prepare_host(set_ip_forward: bool) -> None:
    """The host's shared table, and IPv4 forwarding on (if allowed to set it)."""
    if os.geteuid() != 0:
        raise HostError("sandbox networking needs the server to run as root")
    forward = Path("/proc/sys/net/ipv4/ip_forward")
    if forward.read_text().strip() != "1":
        if not set_ip_forward:
            raise HostError(
                "net.ipv4.ip_forward is 0 and EMBERBOX_NETWORK_SET_IP_FORWARD is false: "
                "enable forwarding, or let emberbox set it"
            )
        forward.write_text("1\n")
        log.warning("set net.ipv4.ip_forward=1 for sandbox networking")
    run(["nft", "-f", "-"], rules.host_ruleset())


def setup(
    plan: NetworkPlan,
    sandbox_id: str,
    records_dir: Path,
    *,
    set_ip_forward: bool,
    keep_record: bool = False,
) -> NetNamespace:
    """Make the sandbox's namespace, links, addresses and rules; returns with the TAP
    open. On failure nothing of it stays (but its record, with ``keep_record``: a
    paused sandbox that failed to resume)."""
    prepare_host(set_ip_forward)
    slot = plan.slot
    if (
        run(["ip", "-4", "route", "show", slot.block]).strip()
        or run(["ip", "-4", "route", "show", slot.tap_link]).strip()
    ):
        raise HostError(
            f"network address block {slot.block} is already routed on this host "
            "(another emberbox server with the same network_cidr?)"
        )
    records.save(records_dir, sandbox_id, plan)
    ns = NetNamespace(sandbox_id, plan, records_dir)
    try:
        run(["ip", "netns", "add", ns.name])
        veth = host_veth_name(sandbox_id)
        run(["ip", "link", "add", veth, "type", "veth", "peer", "name", NS_VETH, "netns", ns.name])
        ns.tap_fd = open_tap(ns.name)
        with contextlib.suppress(OSError):
            Path(f"/proc/sys/net/ipv6/conf/{veth}/disable_ipv6").write_text("1\n")
        # The rules first: no packet is forwarded before they hold.
        ruleset = rules.namespace_ruleset(plan.policy, slot, plan.network_cidr, host_addresses())
        run(["ip", "netns", "exec", ns.name, "nft", "-f", "-"], ruleset)
        run(["ip", "-batch", "-"], _host_links(veth, slot))
        run(["ip", "-n", ns.name, "-batch", "-"], _namespace_links(slot))
    except BaseException:
        ns.remove(keep_record=keep_record)
        raise
    return ns


def _host_links(veth: str, slot: Slot) -> str:
    return "\n".join(
        [
            f"address add {slot.host_veth}/30 dev {veth}",
            f"link set {veth} up",
            f"route add {slot.tap_link} via {slot.ns_veth} dev {veth}",
            "",
        ]
    )


def _namespace_links(slot: Slot) -> str:
    return "\n".join(
        [
            "link set lo up",
            f"address add {slot.ns_veth}/30 dev {NS_VETH}",
            f"link set {NS_VETH} up",
            f"address add {slot.gateway}/30 dev {TAP}",
            f"link set {TAP} up",
            f"route add default via {slot.host_veth}",
            "",
        ]
    )


def open_tap(namespace: str) -> int:
    """Create ``tap0`` inside ``namespace`` and return its descriptor.

    A thread of our own enters the namespace (setns moves only the calling thread),
    sets the namespace's sysctls, creates the TAP, and ends; the descriptor stays
    valid outside.
    """
    result: list[int] = []
    errors: list[BaseException] = []

    def inside() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            ns_fd = os.open(NETNS_DIR / namespace, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(ns_fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {namespace}: {os.strerror(err)}")
            finally:
                os.close(ns_fd)
            for key, value in NS_SYSCTLS.items():
                Path("/proc/sys", key).write_text(value + "\n")
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.ioctl(
                    fd, TUNSETIFF, struct.pack("16sH22x", TAP.encode(), IFF_TAP | IFF_NO_PI)
                )
            except BaseException:
                os.close(fd)
                raise
            result.append(fd)
        except BaseException as exc:  # handed to the caller below
            errors.append(exc)

    thread = threading.Thread(target=inside, name=f"tap-{namespace}", daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise HostError(f"could not create the TAP device in {namespace}: {errors[0]}") from errors[
            0
        ]
    return result[0]


def remove(records_dir: Path, sandbox_id: str, *, keep_record: bool = False) -> None:
    """Remove whatever of the sandbox's network exists (host veth, namespace with its
    rules and links), then its record unless ``keep_record``. Idempotent."""
    veth = host_veth_name(sandbox_id)
    if Path("/sys/class/net", veth).exists():
        with contextlib.suppress(HostError):
            run(["ip", "link", "delete", veth])
    name = namespace_name(sandbox_id)
    if (NETNS_DIR / name).exists():
        run(["ip", "netns", "delete", name])
    if not keep_record:
        records.forget(records_dir, sandbox_id)


def exists(sandbox_id: str) -> bool:
    """True while the sandbox's namespace or host veth is there."""
    return (NETNS_DIR / namespace_name(sandbox_id)).exists() or Path(
        "/sys/class/net", host_veth_name(sandbox_id)
    ).exists()
