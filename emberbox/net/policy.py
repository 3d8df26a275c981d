"""Egress policy: what a sandbox may reach, parsed from the create request (pure).

``network: {"egress": "none" | "allowlist" | "full", "allow": [...]}``. Allow entries are
``IP``, ``CIDR``, ``IP:port``, ``CIDR:port``, ``host:port`` or ``host``; a host name is
resolved once, here, at create time (every IPv4 address it has then). Sandboxes have
IPv4 only. Whatever the policy says, :data:`ALWAYS_DENIED` and the host's own addresses
stay unreachable (see :mod:`emberbox.net.rules`): an allow entry cannot open them.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, cast

from emberbox.errors import InvalidRequest

Egress = Literal["none", "allowlist", "full"]
EGRESS_VALUES: tuple[Egress, ...] = ("none", "allowlist", "full")
#: Host name -> its IPv4 addresses (raises OSError when it does not resolve).
Resolver = Callable[[str], list[str]]

# Never reachable from a sandbox, even when allowlisted (the list, plus the
# multicast, reserved and broadcast blocks, which no sandbox has business with).
ALWAYS_DENIED_V4 = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "168.63.129.16/32",  # Azure's WireServer (VM configuration), outside 169.254/16
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
)
ALWAYS_DENIED_V6 = ("::1/128", "fc00::/7", "fe80::/10")
_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$", re.IGNORECASE)


@dataclass(frozen=True)
class AllowRule:
    """One allowed destination: a network, and a TCP/UDP port or any port (None)."""

    network: ipaddress.IPv4Network
    port: int | None
    entry: str  # as the caller wrote it (a host name gives one rule per address)

    def to_json(self) -> dict[str, object]:
        return {"network": str(self.network), "port": self.port, "entry": self.entry}

    @classmethod
    def from_json(cls, raw: Mapping[str, object]) -> AllowRule:
        port = raw.get("port")
        return cls(
            ipaddress.IPv4Network(str(raw["network"])),
            None if port is None else int(cast(int, port)),
            str(raw["entry"]),
        )


@dataclass(frozen=True)
class EgressPolicy:
    """A networked sandbox's egress: ``full`` or ``allowlist`` (with its rules)."""

    egress: Egress
    allow: tuple[AllowRule, ...] = ()

    def to_json(self) -> dict[str, object]:
        return {"egress": self.egress, "allow": [rule.to_json() for rule in self.allow]}

    @classmethod
    def from_json(cls, raw: Mapping[str, object]) -> EgressPolicy:
        egress = str(raw["egress"])
        if egress not in ("allowlist", "full"):
            raise ValueError(f"bad egress {egress!r}")
        rules = cast(list[Mapping[str, object]], raw.get("allow") or [])
        return cls(cast(Egress, egress), tuple(AllowRule.from_json(r) for r in rules))


def resolve_ipv4(host: str) -> list[str]:
    """Every IPv4 address of ``host`` now (the system resolver)."""
    infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def parse_policy(
    network: Mapping[str, object] | None, *, max_allow: int, resolve: Resolver = resolve_ipv4
) -> EgressPolicy | None:
    """The policy a create request asks for; None for no network (the default).

    Raises InvalidRequest naming the offending field or allow entry.
    """
    if network is None:
        return None
    if not isinstance(network, Mapping):
        raise _bad('network must be an object like {"egress": "full"}')
    unknown = set(network) - {"egress", "allow"}
    if unknown:
        raise _bad(f"network has unknown fields: {', '.join(sorted(map(str, unknown)))}")
    egress = network.get("egress", "none")
    allow = network.get("allow") or []
    if egress not in EGRESS_VALUES:
        raise _bad(f"network.egress must be one of none, allowlist, full (got {egress!r})")
    if not isinstance(allow, list) or not all(isinstance(e, str) for e in allow):
        raise _bad("network.allow must be a list of strings")
    if allow and egress != "allowlist":
        raise _bad(f'network.allow needs egress "allowlist" (egress is {egress!r})')
    if len(allow) > max_allow:
        raise _bad(f"network.allow has {len(allow)} entries; at most {max_allow} are allowed")
    if egress == "none":
        return None
    rules = tuple(rule for entry in allow for rule in parse_entry(entry, resolve))
    return EgressPolicy(cast(Egress, egress), rules)


def parse_entry(entry: str, resolve: Resolver = resolve_ipv4) -> list[AllowRule]:
    """The rules of one allow entry (a host name gives one per address)."""
    text = entry.strip()
    if not text or len(text) > 253 or any(c.isspace() for c in text):
        raise _bad(f"network.allow entry {entry!r} is empty or malformed", entry)
    if text.startswith("[") or text.count(":") > 1:
        raise _bad(f"network.allow entry {entry!r}: IPv6 is not supported (IPv4 only)", entry)
    target, port = _split_port(text, entry)
    try:
        net = ipaddress.ip_network(target, strict=False)
    except ValueError:
        net = None
    if net is not None:
        if not isinstance(net, ipaddress.IPv4Network):
            raise _bad(f"network.allow entry {entry!r}: IPv6 is not supported", entry)
        return [AllowRule(net, port, entry)]
    if "/" in target or _looks_numeric(target):
        raise _bad(f"network.allow entry {entry!r} is not a valid IPv4 address or CIDR", entry)
    if not _is_host_name(target):
        raise _bad(f"network.allow entry {entry!r} is not an address, CIDR or host name", entry)
    try:
        addresses = resolve(target)
    except OSError as exc:
        raise _bad(
            f"network.allow entry {entry!r}: host {target!r} does not resolve", entry
        ) from exc
    if not addresses:
        raise _bad(f"network.allow entry {entry!r}: host {target!r} has no IPv4 address", entry)
    return [AllowRule(ipaddress.IPv4Network(f"{a}/32"), port, entry) for a in addresses]


def _split_port(text: str, entry: str) -> tuple[str, int | None]:
    if ":" not in text:
        return text, None
    target, _, port_text = text.rpartition(":")
    if not target or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise _bad(f"network.allow entry {entry!r}: port must be 1-65535", entry)
    return target, int(port_text)


def _looks_numeric(target: str) -> bool:
    return all(part.isdigit() for part in target.split(".") if part)


def _is_host_name(target: str) -> bool:
    labels = target.rstrip(".").split(".")
    return bool(labels) and all(_HOST_LABEL.match(label) for label in labels)


def _bad(message: str, entry: str | None = None) -> InvalidRequest:
    details = {"field": "network"} if entry is None else {"field": "network.allow", "entry": entry}
    return InvalidRequest(message, **details)
