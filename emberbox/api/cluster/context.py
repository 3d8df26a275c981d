"""What the cluster routes get injected: the hosts (:class:`HostDirectory`, the
``emberbox.cluster.Cluster`` in production), the sandbox index and the host proxy.

One :class:`ClusterContext` per app on ``app.state.cluster``, never a module global.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Protocol
from urllib.parse import quote

import httpx
from fastapi import Depends
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response

from emberbox import errors
from emberbox.api.cluster.proxy import HostProxy, UpstreamResponse, request_headers, upstream_url
from emberbox.cluster.hosts import HostEndpoint, HostStatus
from emberbox.config import Settings
from emberbox.service.cluster_index import SandboxIndex


class HostDirectory(Protocol):
    """What a replica needs of the cluster (``emberbox.cluster.hosts.Cluster``)."""

    async def hosts(self) -> list[HostStatus]: ...

    async def endpoint(self, name: str) -> HostEndpoint: ...

    async def drain(self, name: str, on: bool) -> None: ...

    async def dead_nodes(self) -> set[str]: ...  # for the host monitor


@dataclass(frozen=True)
class ClusterContext:
    settings: Settings
    cluster: HostDirectory
    index: SandboxIndex
    proxy: HostProxy

    async def endpoint(self, host: str | None) -> HostEndpoint:
        """The host's URL and key; HostDown for a row without a host or a host down."""
        if host is None:
            raise errors.HostDown("the object has no host in the index")
        return await self.cluster.endpoint(host)

    async def forward(self, request: Request, host: str | None) -> UpstreamResponse:
        """``request`` relayed to ``host`` as it came (see :mod:`.proxy`)."""
        endpoint = await self.endpoint(host)
        try:
            return await self.proxy.forward(request, endpoint.name, endpoint.url, endpoint.key)
        except errors.HostDown:
            self._forget(endpoint.name)
            raise

    def _forget(self, host: str) -> None:
        """Drop a cached endpoint that failed (a restarted host has a new URL and key)."""
        forget = getattr(self.cluster, "forget", None)
        if callable(forget):
            forget(host)

    async def call(
        self, host: str | None, method: str, path: str, body: bytes | None = None
    ) -> httpx.Response:
        """One small request of the replica's own to ``host``, its answer read whole."""
        endpoint = await self.endpoint(host)
        headers = [(b"accept", b"application/json")]
        if body is not None:
            headers.append((b"content-type", b"application/json"))
        headers = request_headers(headers, key=endpoint.key)
        url = upstream_url(endpoint.url, path)
        try:
            response = await self.proxy.open(endpoint.name, method, url, headers, body)
        except errors.HostDown:
            self._forget(endpoint.name)
            raise
        try:
            await response.aread()
        except httpx.HTTPError as exc:
            raise errors.HostDown(f"host {endpoint.name} went away mid-answer") from exc
        finally:
            await response.aclose()
        return response

    async def any_alive_host(self) -> str:
        """A host that answers (for the calls every host answers alike: images,
        languages); HostDown when none does."""
        for status in sorted(await self.cluster.hosts(), key=lambda s: (s.draining, s.name)):
            if status.alive:
                return status.name
        raise errors.HostDown("no host of the cluster answers; try again later")


def passthrough(response: httpx.Response) -> Response:
    """A host's (error) answer, read whole, as the caller gets it."""
    media_type = response.headers.get("content-type", "application/json")
    return Response(response.content, status_code=response.status_code, media_type=media_type)


def sandbox_path(sandbox_id: str, *rest: str) -> str:
    return "/".join(("/v1/sandboxes", quote(sandbox_id, safe=""), *rest))


def get_cluster_context(connection: HTTPConnection) -> ClusterContext:
    context = connection.app.state.cluster
    assert isinstance(context, ClusterContext)
    return context


ClusterDep = Annotated[ClusterContext, Depends(get_cluster_context)]
