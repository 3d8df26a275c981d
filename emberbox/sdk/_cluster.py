"""A cluster's hosts (``emberbox serve --cluster``; docs/cluster.md), blocking
(:class:`Cluster`) and asyncio (:class:`AsyncCluster`), same calls; admin keys only
(Unauthorized otherwise). ``url`` and ``api_key`` as for :class:`~emberbox.sdk.Sandbox`.

>>> [(h.name, h.alive, h.sandboxes) for h in Cluster.hosts()]
>>> Cluster.drain("host-2")            # no new sandboxes there
>>> Cluster.drain("host-2", on=False)  # open again
"""

from __future__ import annotations

import builtins
from urllib.parse import quote

import httpx

from emberbox.models.cluster import HostList, HostPublic
from emberbox.sdk import _calls
from emberbox.sdk._calls import Call, ClientConfig


class HostInfo(HostPublic):
    """One host: ``name``, ``alive``, ``draining``, ``sandboxes`` of ``max_sandboxes``,
    ``free_memory_mib``, ``images``."""


def hosts_call() -> Call:
    return Call("GET", "/v1/cluster/hosts")


def drain_call(name: str, on: bool) -> Call:
    return Call("POST", f"/v1/cluster/hosts/{quote(name, safe='')}/drain", json={"drain": on})


def parse_hosts(response: httpx.Response) -> builtins.list[HostInfo]:
    hosts = _calls.parse(HostList, response).hosts
    return [HostInfo.model_validate(host.model_dump()) for host in hosts]


class Cluster:
    """The hosts of a cluster, through its API (blocking)."""

    @staticmethod
    def hosts(*, url: str | None = None, api_key: str | None = None) -> builtins.list[HostInfo]:
        """Every host of the cluster, by name, as the API replica sees it now."""
        return parse_hosts(_send(hosts_call(), url, api_key))

    @staticmethod
    def drain(
        name: str, on: bool = True, *, url: str | None = None, api_key: str | None = None
    ) -> builtins.list[HostInfo]:
        """Drain host ``name`` (``on=False``: take new sandboxes again); its sandboxes
        keep running. Returns every host; NotFound for an unknown name."""
        return parse_hosts(_send(drain_call(name, on), url, api_key))


class AsyncCluster:
    """The hosts of a cluster, through its API (asyncio)."""

    @staticmethod
    async def hosts(
        *, url: str | None = None, api_key: str | None = None
    ) -> builtins.list[HostInfo]:
        """Every host of the cluster, by name, as the API replica sees it now."""
        return parse_hosts(await _send_async(hosts_call(), url, api_key))

    @staticmethod
    async def drain(
        name: str, on: bool = True, *, url: str | None = None, api_key: str | None = None
    ) -> builtins.list[HostInfo]:
        """Drain host ``name`` (``on=False``: take new sandboxes again)."""
        return parse_hosts(await _send_async(drain_call(name, on), url, api_key))


def _send(call: Call, url: str | None, api_key: str | None) -> httpx.Response:
    config = ClientConfig.resolve(url, api_key)
    with httpx.Client(**config.client_options()) as client:
        try:
            return client.request(**call.request_options())
        except httpx.TransportError as exc:
            raise _calls.transport_error(exc, config) from exc


async def _send_async(call: Call, url: str | None, api_key: str | None) -> httpx.Response:
    config = ClientConfig.resolve(url, api_key)
    async with httpx.AsyncClient(**config.client_options()) as client:
        try:
            return await client.request(**call.request_options())
        except httpx.TransportError as exc:
            raise _calls.transport_error(exc, config) from exc
