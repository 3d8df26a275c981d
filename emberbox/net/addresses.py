"""Addresses and names of a sandbox's network (pure).

``network_cidr`` is cut into /29 slots, one per networked sandbox::

    slot + 0/30   the TAP link inside the sandbox's namespace
        +1        gateway (tap0, in the namespace)
        +2        the guest: the sandbox's ``ip_address``
    slot + 4/30   the veth link between the namespace and the host
        +5        host end (ebh<id>, in the host's namespace)
        +6        namespace end (veth0)

A slot is identified by its guest address, which is what the store keeps in
``sandboxes.ip_address``: the slots in use are the ip_address values of the live rows,
so allocation survives a server restart.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from emberbox.errors import InvalidRequest, QuotaExceeded

SLOT_PREFIX = 29
LINK_PREFIX = 30
NAMESPACE_PREFIX = "emberbox-"
HOST_VETH_PREFIX = "ebh"  # the host's nftables rules match this name prefix
NS_VETH = "veth0"
TAP = "tap0"
IFNAME_MAX = 15


@dataclass(frozen=True)
class Slot:
    """The four addresses of one sandbox's network."""

    base: ipaddress.IPv4Address

    @classmethod
    def of_guest(cls, guest: str) -> Slot:
        return cls(ipaddress.IPv4Address(guest) - 2)

    @property
    def gateway(self) -> str:
        return str(self.base + 1)

    @property
    def guest(self) -> str:
        return str(self.base + 2)

    @property
    def host_veth(self) -> str:
        return str(self.base + 5)

    @property
    def ns_veth(self) -> str:
        return str(self.base + 6)

    @property
    def block(self) -> str:
        return f"{self.base}/{SLOT_PREFIX}"

    @property
    def tap_link(self) -> str:
        return f"{self.base}/{LINK_PREFIX}"


def parse_cidr(cidr: str) -> ipaddress.IPv4Network:
    """``network_cidr`` checked: IPv4, and room for at least one slot."""
    try:
        net = ipaddress.ip_network(cidr, strict=True)
    except ValueError as exc:
        raise InvalidRequest(f"network_cidr {cidr!r} is not a network: {exc}") from exc
    if not isinstance(net, ipaddress.IPv4Network) or net.prefixlen > SLOT_PREFIX:
        raise InvalidRequest(f"network_cidr {cidr!r} must be IPv4 and /{SLOT_PREFIX} or larger")
    return net


def allocate(cidr: str, used: Iterable[str | None]) -> Slot:
    """The first slot of ``cidr`` whose guest address is not in ``used``."""
    net = parse_cidr(cidr)
    taken = {u for u in used if u}
    for block in net.subnets(new_prefix=SLOT_PREFIX):
        slot = Slot(block.network_address)
        if slot.guest not in taken:
            return slot
    raise QuotaExceeded(
        f"no free network address in network_cidr {cidr} ({len(taken)} in use)", cidr=cidr
    )


def namespace_name(sandbox_id: str) -> str:
    return NAMESPACE_PREFIX + sandbox_id


def host_veth_name(sandbox_id: str) -> str:
    """The host end's interface name (at most 15 bytes: the id is cut to 12)."""
    return (HOST_VETH_PREFIX + sandbox_id)[:IFNAME_MAX]
