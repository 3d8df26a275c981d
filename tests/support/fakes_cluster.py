"""A stand-in for ``emberbox.cluster.hosts.Cluster`` over REAL host servers: the hosts
are ``emberbox serve`` processes (:func:`tests.support.servers.serve_emberbox`) with
their admin keys; only the Ray part (actors, node liveness) is faked. Type-checked
against the API replica's :class:`~emberbox.api.cluster.context.HostDirectory`."""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx

from emberbox import errors
from emberbox.api.cluster.context import HostDirectory
from emberbox.cluster.hosts import HostEndpoint, HostStatus

FREE_MEMORY_MIB = 64 * 1024


@dataclass
class FakeHost:
    name: str
    url: str
    key: str
    max_sandboxes: int = 4
    draining: bool = False
    down: bool = False  # as if its node died: no status, no endpoint


@dataclass
class FakeCluster:
    """Hosts by name; ``hosts()`` asks each server for its running sandboxes."""

    hosts_by_name: dict[str, FakeHost] = field(default_factory=dict)
    images: tuple[str, ...] = ("default",)

    def add(self, host: FakeHost) -> None:
        self.hosts_by_name[host.name] = host

    async def hosts(self) -> list[HostStatus]:
        return [await self._status(host) for host in self.hosts_by_name.values()]

    async def _status(self, host: FakeHost) -> HostStatus:
        if host.down:
            return HostStatus(host.name, False, host.draining, None, 0, host.max_sandboxes, 0, ())
        headers = {"Authorization": f"Bearer {host.key}"}
        async with httpx.AsyncClient(base_url=host.url, headers=headers, timeout=10) as client:
            listed = (await client.get("/v1/sandboxes", params={"state": "running"})).json()
        running = len(listed["sandboxes"])
        return HostStatus(
            host.name,
            True,
            host.draining,
            host.url,
            running,
            host.max_sandboxes,
            FREE_MEMORY_MIB,
            self.images,
        )

    async def endpoint(self, name: str) -> HostEndpoint:
        host = self.hosts_by_name.get(name)
        if host is None:
            raise errors.NotFound(f"no host {name}")
        if host.down:
            raise errors.HostDown(f"host {name} does not answer")
        return HostEndpoint(name, host.url, host.key)

    async def drain(self, name: str, on: bool) -> None:
        host = self.hosts_by_name.get(name)
        if host is None:
            raise errors.NotFound(f"no host {name}")
        host.draining = on

    async def dead_nodes(self) -> set[str]:
        return set()


def _typed(cluster: FakeCluster) -> HostDirectory:  # mypy: the fake fits the Protocol
    return cluster
