"""Which host takes a new sandbox (pure: statuses in, a host name or NoCapacity out).

Among the hosts that are alive, not draining and have room (fewer sandboxes than their
``max_sandboxes`` and ``memory_mib`` + :data:`MEMORY_MARGIN_MIB` of free memory), prefer
those that already hold the image; if none of them does, any host with room (it builds
or pulls the image). Then the most free memory, then the fewest sandboxes, then the name
(so that the choice is deterministic).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence

from emberbox.cluster.hosts import HostStatus
from emberbox.errors import NoCapacity

MEMORY_MARGIN_MIB = 256  # the VMM's own memory and the host's page cache headroom
RETRY_AFTER_S = 5.0


def has_room(host: HostStatus, memory_mib: int) -> bool:
    """Alive, not draining, below its sandbox limit, with memory for one more."""
    return (
        host.alive
        and not host.draining
        and host.sandboxes < host.max_sandboxes
        and host.free_memory_mib >= memory_mib + MEMORY_MARGIN_MIB
    )


def with_placed(
    hosts: Sequence[HostStatus], indexed: Mapping[str, int], memory_mib: int
) -> list[HostStatus]:
    """The hosts' statuses with the sandboxes the index already places on them: a host
    reports its count about once a second, so creates in a row (or on other replicas)
    would otherwise all see the same free host. Each sandbox the index has beyond the
    host's own count also takes ``memory_mib`` off its free memory."""
    adjusted = []
    for host in hosts:
        extra = max(0, indexed.get(host.name, 0) - host.sandboxes)
        adjusted.append(
            dataclasses.replace(
                host,
                sandboxes=host.sandboxes + extra,
                free_memory_mib=max(0, host.free_memory_mib - extra * memory_mib),
            )
        )
    return adjusted


def place(
    hosts: Sequence[HostStatus],
    *,
    image: str,
    memory_mib: int,
    refused: Collection[str] = (),
) -> str:
    """The name of the host for a sandbox of ``image`` with ``memory_mib`` of memory,
    other than the hosts in ``refused`` (they turned this create down already).

    Raises :class:`NoCapacity` (HTTP 503, Retry-After) when no host has room.
    """
    fitting = [h for h in hosts if has_room(h, memory_mib) and h.name not in refused]
    if not fitting:
        raise NoCapacity(_refusal(hosts), retry_after_s=RETRY_AFTER_S, hosts=len(hosts))
    with_image = [host for host in fitting if image in host.images]
    best = min(with_image or fitting, key=lambda h: (-h.free_memory_mib, h.sandboxes, h.name))
    return best.name


def _refusal(hosts: Sequence[HostStatus]) -> str:
    if not hosts:
        return "no host is registered in the cluster; try again later"
    alive = [host for host in hosts if host.alive]
    if not alive:
        return f"no host is reachable ({len(hosts)} registered); try again later"
    open_hosts = [host for host in alive if not host.draining]
    if not open_hosts:
        return f"every reachable host is draining ({len(alive)}); try again later"
    return f"every host is full ({len(open_hosts)} open); try again later"
