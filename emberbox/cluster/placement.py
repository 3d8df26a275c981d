"""Which host takes a new sandbox (pure: statuses in, a host name or NoCapacity out).

Among the hosts that are alive, not draining and have room (fewer sandboxes than their
``max_sandboxes`` and ``memory_mib`` + :data:`MEMORY_MARGIN_MIB` of free memory), prefer
those that already hold the image; if none of them does, any host with room (it builds
or pulls the image). Then the most free memory, then the fewest sandboxes, then the name
(so that the choice is deterministic).
"""

from __future__ import annotations

from collections.abc import Sequence

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


def place(hosts: Sequence[HostStatus], *, image: str, memory_mib: int) -> str:
    """The name of the host for a sandbox of ``image`` with ``memory_mib`` of memory.

    Raises :class:`NoCapacity` (HTTP 503, Retry-After) when no host has room.
    """
    fitting = [host for host in hosts if has_room(host, memory_mib)]
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
