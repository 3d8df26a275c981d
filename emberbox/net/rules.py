"""The nftables rulesets, rendered as text for ``nft -f`` (pure).

Two tables:

* ``inet emberbox`` in each sandbox's own namespace (gone with the namespace): the guest
  may send only from its own address, only to what its policy allows, never to
  :data:`~emberbox.net.policy.ALWAYS_DENIED_V4`, the host's addresses or another
  sandbox; nothing may start a connection to the guest; the namespace itself answers
  nothing (ARP is not filtered by ``inet`` and is all the guest needs of it); IPv6 is
  dropped.
* ``inet emberbox`` in the host's namespace, shared by every sandbox (it names no
  sandbox: it matches the ``ebh*`` interfaces): NAT out, no packet from a sandbox to the
  host itself, none between two sandboxes, no new connection into a sandbox.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from emberbox.net.addresses import HOST_VETH_PREFIX, NS_VETH, TAP, Slot
from emberbox.net.policy import ALWAYS_DENIED_V4, ALWAYS_DENIED_V6, EgressPolicy

TABLE = "emberbox"


def _set(items: Iterable[str]) -> str:
    return "{ " + ", ".join(items) + " }"


def namespace_ruleset(
    policy: EgressPolicy, slot: Slot, network_cidr: str, host_addresses: Iterable[str]
) -> str:
    """The namespace's table: replaces any earlier one atomically."""
    host4 = sorted(a for a in host_addresses if ipaddress.ip_address(a).version == 4)
    host6 = sorted(a for a in host_addresses if ipaddress.ip_address(a).version == 6)
    egress = [
        "meta nfproto ipv6 drop",
        f"ip daddr {_set(ALWAYS_DENIED_V4)} drop",
        f"ip daddr {network_cidr} drop",
        *([f"ip daddr {_set(host4)} drop"] if host4 else []),
        "ip daddr 255.255.255.255 drop",
        *_allow_lines(policy),
        "drop",
    ]
    deny6 = [f"ip6 daddr {_set((*ALWAYS_DENIED_V6, *host6))} drop"]
    return "\n".join(
        [
            f"table inet {TABLE} {{}}",
            f"delete table inet {TABLE}",
            f"table inet {TABLE} {{",
            "  chain input {",
            "    type filter hook input priority 0; policy drop;",
            '    iifname "lo" accept',
            "  }",
            "  chain forward {",
            "    type filter hook forward priority 0; policy drop;",
            *(f"    {line}" for line in deny6),
            f'    iifname "{NS_VETH}" oifname "{TAP}" ip daddr {slot.guest} '
            "ct state established,related accept",
            f'    iifname "{TAP}" oifname "{NS_VETH}" ip saddr {slot.guest} jump egress',
            "  }",
            "  chain egress {",
            *(f"    {line}" for line in egress),
            "  }",
            "}",
            "",
        ]
    )


def _allow_lines(policy: EgressPolicy) -> list[str]:
    if policy.egress == "full":
        return ["accept"]
    lines = []
    for rule in policy.allow:
        if rule.port is None:
            lines.append(f"ip daddr {rule.network} accept")
        else:
            lines.append(
                f"ip daddr {rule.network} meta l4proto {{ tcp, udp }} th dport {rule.port} accept"
            )
    return lines


def host_ruleset() -> str:
    """The host's shared table (the same text from every server: idempotent)."""
    ebh = f'"{HOST_VETH_PREFIX}*"'
    return "\n".join(
        [
            f"table inet {TABLE} {{}}",
            f"delete table inet {TABLE}",
            f"table inet {TABLE} {{",
            "  chain input {",
            "    type filter hook input priority -10; policy accept;",
            f"    iifname {ebh} drop",
            "  }",
            "  chain forward {",
            "    type filter hook forward priority -10; policy accept;",
            f"    iifname {ebh} oifname {ebh} drop",
            f"    oifname {ebh} ct state established,related accept",
            f"    oifname {ebh} drop",
            "  }",
            "  chain postrouting {",
            "    type nat hook postrouting priority 100; policy accept;",
            f"    iifname {ebh} oifname != {ebh} masquerade",
            "  }",
            "}",
            "",
        ]
    )
