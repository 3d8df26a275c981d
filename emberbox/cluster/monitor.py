"""HostMonitor: host liveness, lost sandboxes, and reconciling a host that comes back.

Each API replica runs one (:meth:`HostMonitor.run` in its lifespan). Every round:

- a host counts as **down** when the Ray node its actor last ran on is dead, or when it
  has not answered for ``down_after_s``: its row in ``hosts`` says ``down`` and its
  sandboxes that were creating, running, paused or stopping become ``lost`` (one
  statement, so two replicas doing it at once change each row once);
- a host that answers again (or answers from a new URL: its server restarted) is
  **reconciled** (reconcile.py) before its row says ``up`` again; every
  ``sync_every`` rounds every live host is reconciled, which also brings the host's
  own changes (a TTL expiry) into the index.

Every change is a compare-and-set on the store or an idempotent kill on the host, so two
replicas can run this at the same time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from datetime import UTC, datetime
from typing import Protocol

import anyio
import httpx

from emberbox.cluster import reconcile
from emberbox.cluster.hosts import HostEndpoint, HostStatus, dead_status
from emberbox.errors import Conflict, EmberboxError, NotFound
from emberbox.store.hosts import HostRow
from emberbox.store.records import SandboxRow

log = logging.getLogger(__name__)

DOWN_AFTER_S = 10.0  # not answering this long (and its node not yet declared dead): down
INTERVAL_S = 2.0
SYNC_EVERY = 5  # rounds between reconciliations of live hosts
HTTP_TIMEOUT_S = 10.0
LOST_FROM = ("creating", "running", "paused", "stopping")


class HostIndex(Protocol):
    """What the monitor needs of the store (emberbox.store.Store has it)."""

    async def list_hosts(self) -> list[HostRow]: ...
    async def upsert_host(self, row: HostRow) -> HostRow: ...
    async def set_host(
        self, name: str, *, state: str | None = None, draining: bool | None = None
    ) -> HostRow: ...
    async def mark_lost(self, host: str, from_states: Collection[str]) -> list[str]: ...
    async def list(self, *, host: str | None = None) -> list[SandboxRow]: ...
    async def transition(
        self, sandbox_id: str, from_states: Collection[str], to_state: str
    ) -> SandboxRow: ...


class HostView(Protocol):
    """What the monitor needs of the cluster (hosts.Cluster has it)."""

    async def hosts(self) -> list[HostStatus]: ...
    async def dead_nodes(self) -> set[str]: ...
    async def endpoint(self, name: str) -> HostEndpoint: ...


class HostServers(Protocol):
    """The host servers' own API: their sandbox list and kill."""

    async def sandboxes(self, endpoint: HostEndpoint) -> list[reconcile.RemoteSandbox]: ...
    async def kill(self, endpoint: HostEndpoint, sandbox_id: str) -> None: ...


class HttpHostServers:
    """:class:`HostServers` over HTTP with the host's admin key."""

    async def sandboxes(self, endpoint: HostEndpoint) -> list[reconcile.RemoteSandbox]:
        async with _client(endpoint) as client:
            response = (await client.get("/v1/sandboxes")).raise_for_status()
        return [
            reconcile.RemoteSandbox(
                str(raw["id"]), str(raw["state"]), datetime.fromisoformat(raw["created_at"])
            )
            for raw in response.json()["sandboxes"]
        ]

    async def kill(self, endpoint: HostEndpoint, sandbox_id: str) -> None:
        async with _client(endpoint) as client:
            response = await client.delete(f"/v1/sandboxes/{sandbox_id}")
        if response.status_code not in (200, 204, 404, 409):
            response.raise_for_status()


def _client(endpoint: HostEndpoint) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {endpoint.key}"}
    return httpx.AsyncClient(base_url=endpoint.url, headers=headers, timeout=HTTP_TIMEOUT_S)


class HostMonitor:
    def __init__(
        self,
        store: HostIndex,
        cluster: HostView,
        *,
        servers: HostServers | None = None,
        down_after_s: float = DOWN_AFTER_S,
        sync_every: int = SYNC_EVERY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._cluster = cluster
        self._servers = servers or HttpHostServers()
        self._down_after_s = down_after_s
        self._sync_every = max(1, sync_every)
        self._clock = clock
        self._unreachable_since: dict[str, float] = {}
        self._rounds = 0

    async def run(self, interval_s: float = INTERVAL_S) -> None:
        """Run rounds until cancelled; a failed round is logged, not fatal."""
        while True:
            try:
                await self.run_once()
            except Exception:  # the store or Ray failed this round; the next one retries
                log.exception("host monitor round failed")
            await anyio.sleep(interval_s)

    async def run_once(self) -> None:
        self._rounds += 1
        sync_all = self._rounds % self._sync_every == 0
        rows = {row.name: row for row in await self._store.list_hosts()}
        statuses = {status.name: status for status in await self._cluster.hosts()}
        for known in rows.values():  # a host in the table that Ray no longer knows
            statuses.setdefault(known.name, dead_status(known.name, known.node_id))
        dead_nodes = await self._dead_nodes(statuses.values())
        for name, status in sorted(statuses.items()):
            try:
                await self._check(status, rows.get(name), dead_nodes, sync_all)
            except (EmberboxError, httpx.HTTPError, OSError) as exc:  # the others still count
                log.warning("host monitor: host %s: %s", name, exc)

    async def _check(
        self, status: HostStatus, row: HostRow | None, dead_nodes: set[str], sync_all: bool
    ) -> None:
        if status.alive:
            self._unreachable_since.pop(status.name, None)
            await self._host_up(status, row, sync_all)
        elif status.reachable:  # the actor answers, its server is slow: not down
            self._unreachable_since.pop(status.name, None)
        elif self._is_down(status, dead_nodes):
            await self._host_down(status, row)

    async def _dead_nodes(self, statuses: Collection[HostStatus]) -> set[str]:
        if all(status.alive for status in statuses):
            return set()
        return await self._cluster.dead_nodes()

    def _is_down(self, status: HostStatus, dead_nodes: set[str]) -> bool:
        now = self._clock()
        since = self._unreachable_since.setdefault(status.name, now)
        if status.node_id is not None and status.node_id in dead_nodes:
            return True
        return bool(now - since >= self._down_after_s)

    async def _host_down(self, status: HostStatus, row: HostRow | None) -> None:
        if row is None:
            await self._store.upsert_host(HostRow(status.name, None, status.node_id, "down"))
        elif row.state != "down":
            await self._store.set_host(status.name, state="down")
        lost = await self._store.mark_lost(status.name, LOST_FROM)
        if row is None or row.state != "down" or lost:
            log.warning("host %s is down; %d sandboxes lost: %s", status.name, len(lost), lost)

    async def _host_up(self, status: HostStatus, row: HostRow | None, sync_all: bool) -> None:
        came_back = row is None or row.state != "up" or row.url != status.url
        if came_back or sync_all:
            await self.reconcile(status.name)  # before "up": a failure retries next round
        if came_back or row is None or row.node_id != status.node_id:
            up = HostRow(status.name, status.url, status.node_id, "up", status.draining)
            await self._store.upsert_host(up)
            if came_back:
                log.info("host %s is up at %s", status.name, status.url)
        elif row.draining != status.draining:
            await self._store.set_host(status.name, draining=status.draining)

    async def reconcile(self, name: str) -> reconcile.Plan:
        """Bring host ``name``'s index rows and its server's sandboxes into agreement."""
        endpoint = await self._cluster.endpoint(name)
        remote = await self._servers.sandboxes(endpoint)
        index = {row.id: row.state for row in await self._store.list(host=name)}
        todo = reconcile.plan(index, remote, now=datetime.now(UTC))
        for move in todo.moves:
            try:
                await self._store.transition(move.sandbox_id, [move.from_state], move.to_state)
            except (Conflict, NotFound):
                continue  # another replica or an API call changed it first
            log.info(
                "sandbox %s on %s: %s -> %s", move.sandbox_id, name, move.from_state, move.to_state
            )
        for sandbox_id in todo.kill:
            log.warning("killing orphan sandbox %s on host %s", sandbox_id, name)
            await self._servers.kill(endpoint, sandbox_id)
        return todo
