"""HostMonitor (emberbox/cluster/monitor.py): liveness, lost sandboxes and reconciliation,
on a real SQLite store with a scripted cluster and host servers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from emberbox.cluster.hosts import HostEndpoint, HostStatus, dead_status
from emberbox.cluster.monitor import HostMonitor
from emberbox.cluster.reconcile import RemoteSandbox
from emberbox.errors import HostDown
from emberbox.store import Store
from tests.support.rows import make_row

pytestmark = pytest.mark.anyio
OLD = datetime.now(UTC) - timedelta(hours=1)


def up(name: str, node: str = "n1", url: str | None = None) -> HostStatus:
    url = url or f"http://{name}:1"
    return HostStatus(name, True, False, url, 0, 4, 8192, ("default",), node)


@dataclass
class ScriptedCluster:
    """The cluster as the test says it is right now."""

    statuses: dict[str, HostStatus] = field(default_factory=dict)
    dead: set[str] = field(default_factory=set)

    async def hosts(self) -> list[HostStatus]:
        return list(self.statuses.values())

    async def dead_nodes(self) -> set[str]:
        return set(self.dead)

    async def endpoint(self, name: str) -> HostEndpoint:
        status = self.statuses[name]
        if not status.alive or status.url is None:
            raise HostDown(f"host {name} does not answer")
        return HostEndpoint(name, status.url, "key")


@dataclass
class ScriptedServers:
    """Each host server's sandbox list; kills are recorded and applied."""

    listed: dict[str, dict[str, str]] = field(default_factory=dict)  # url -> id -> state
    killed: list[str] = field(default_factory=list)

    async def sandboxes(self, endpoint: HostEndpoint) -> list[RemoteSandbox]:
        listed = self.listed.setdefault(endpoint.url, {})
        return [RemoteSandbox(i, state, OLD) for i, state in listed.items()]

    async def kill(self, endpoint: HostEndpoint, sandbox_id: str) -> None:
        self.killed.append(sandbox_id)
        self.listed[endpoint.url][sandbox_id] = "stopped"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with await Store.open(tmp_path / "emberbox.db") as opened:
        yield opened


async def states(store: Store) -> dict[str, str]:
    return {row.id: row.state for row in await store.list()}


async def seed(store: Store, servers: ScriptedServers, host: str, **by_id: str) -> None:
    """Index rows on ``host``, and the same sandboxes in that host server's list."""
    for sandbox_id, state in by_id.items():
        await store.insert(make_row(sandbox_id, state=state, host=host))
        servers.listed.setdefault(f"http://{host}:1", {})[sandbox_id] = state


async def test_dead_node_makes_its_sandboxes_lost_at_once(store: Store) -> None:
    """The node is dead: the host is down and its live sandboxes lost, others untouched."""
    cluster = ScriptedCluster({"a": up("a", "n1"), "b": up("b", "n2", "http://b:1")})
    servers = ScriptedServers()
    monitor = HostMonitor(store, cluster, servers=servers, clock=Clock())
    await seed(store, servers, "a", a1="running", a2="paused", a3="stopped")
    await seed(store, servers, "b", b1="running")
    await monitor.run_once()
    cluster.statuses["a"] = dead_status("a", "n1")
    cluster.dead = {"n1"}
    await monitor.run_once()
    assert await states(store) == {"a1": "lost", "a2": "lost", "a3": "stopped", "b1": "running"}
    host_a = await store.get_host("a")
    assert host_a is not None and host_a.state == "down"


async def test_unanswering_host_is_down_only_after_the_delay(store: Store) -> None:
    """A host that stops answering while its node lives: down after down_after_s, not before."""
    clock = Clock()
    cluster = ScriptedCluster({"a": up("a")})
    servers = ScriptedServers()
    monitor = HostMonitor(store, cluster, servers=servers, down_after_s=10, clock=clock)
    await seed(store, servers, "a", a1="running")
    await monitor.run_once()
    cluster.statuses["a"] = dead_status("a", "n1")
    await monitor.run_once()
    clock.now += 9
    await monitor.run_once()
    assert await states(store) == {"a1": "running"}
    clock.now += 1
    await monitor.run_once()
    assert await states(store) == {"a1": "lost"}


async def test_host_back_reconciles(store: Store) -> None:
    """Back: survivors run again, orphans are killed, unknown rows stay lost, row says up."""
    servers = ScriptedServers()
    cluster = ScriptedCluster({"a": up("a", "n1", "http://a:1")})
    monitor = HostMonitor(store, cluster, servers=servers, clock=Clock())
    await seed(store, servers, "a", alive="running", gone="running", ended="stopped")
    await monitor.run_once()
    cluster.statuses["a"] = dead_status("a", "n1")
    cluster.dead = {"n1"}
    await monitor.run_once()
    assert await states(store) == {"alive": "lost", "gone": "lost", "ended": "stopped"}
    servers.listed["http://a:2"] = {"alive": "running", "ended": "running", "stray": "running"}
    cluster.statuses["a"] = up("a", "n3", "http://a:2")
    await monitor.run_once()
    assert await states(store) == {"alive": "running", "gone": "lost", "ended": "stopped"}
    assert sorted(servers.killed) == ["ended", "stray"]
    host_a = await store.get_host("a")
    assert host_a is not None and (host_a.state, host_a.url, host_a.node_id) == (
        "up",
        "http://a:2",
        "n3",
    )


async def test_periodic_sync_brings_host_changes_in(store: Store) -> None:
    """A sandbox the host stopped itself (TTL) is stopped in the index within sync_every rounds."""
    servers = ScriptedServers()
    cluster = ScriptedCluster({"a": up("a")})
    monitor = HostMonitor(store, cluster, servers=servers, sync_every=3, clock=Clock())
    await seed(store, servers, "a", s1="running")
    await monitor.run_once()  # first sight: reconciled
    servers.listed["http://a:1"]["s1"] = "stopped"
    await monitor.run_once()
    assert await states(store) == {"s1": "running"}  # not a sync round
    await monitor.run_once()
    assert await states(store) == {"s1": "stopped"}


async def test_two_monitors_at_once_agree(store: Store) -> None:
    """Two replicas' monitors on one store: same result, each row moved once, no error."""
    servers = ScriptedServers()
    cluster = ScriptedCluster({"a": up("a")})
    first = HostMonitor(store, cluster, servers=servers, clock=Clock())
    second = HostMonitor(store, cluster, servers=servers, clock=Clock())
    await seed(store, servers, "a", a1="running")
    await first.run_once()
    await second.run_once()
    cluster.statuses["a"] = dead_status("a", "n1")
    cluster.dead = {"n1"}
    await first.run_once()
    await second.run_once()
    assert await states(store) == {"a1": "lost"}
    servers.listed["http://a:1"] = {"a1": "running"}
    cluster.statuses["a"] = up("a")
    await first.run_once()
    await second.run_once()
    assert await states(store) == {"a1": "running"}
    assert servers.killed == []


async def test_draining_flag_reaches_the_table(store: Store) -> None:
    """A host drained through its actor: the hosts row says draining."""
    cluster = ScriptedCluster({"a": up("a")})
    monitor = HostMonitor(store, cluster, servers=ScriptedServers(), clock=Clock())
    await monitor.run_once()
    cluster.statuses["a"] = replace(up("a"), draining=True)
    await monitor.run_once()
    host_a = await store.get_host("a")
    assert host_a is not None and host_a.draining


async def test_host_only_in_the_table_goes_down(store: Store) -> None:
    """A host row whose actor Ray no longer lists counts as unreachable (down after the delay)."""
    clock = Clock()
    cluster = ScriptedCluster({"a": up("a")})
    servers = ScriptedServers()
    monitor = HostMonitor(store, cluster, servers=servers, down_after_s=5, clock=clock)
    await seed(store, servers, "a", a1="running")
    await monitor.run_once()
    del cluster.statuses["a"]
    await monitor.run_once()
    clock.now += 5
    await monitor.run_once()
    assert await states(store) == {"a1": "lost"}


async def test_one_failing_host_does_not_stop_the_round(store: Store) -> None:
    """Host a's server cannot list its sandboxes: host b's death is still handled."""

    class Broken(ScriptedServers):
        async def sandboxes(self, endpoint: HostEndpoint) -> list[RemoteSandbox]:
            if endpoint.name == "a":
                raise httpx.ConnectError("refused")
            return await super().sandboxes(endpoint)

    servers = Broken()
    cluster = ScriptedCluster({"a": up("a", "n1"), "b": up("b", "n2")})
    monitor = HostMonitor(store, cluster, servers=servers, clock=Clock())
    await seed(store, servers, "b", b1="running")
    await monitor.run_once()
    cluster.statuses["b"] = dead_status("b", "n2")
    cluster.dead = {"n2"}
    await monitor.run_once()
    assert await states(store) == {"b1": "lost"}
    assert await store.get_host("a") is None  # not reconciled: not marked up either


async def test_a_slow_server_behind_a_live_actor_is_not_down(store: Store) -> None:
    """The actor answers but its server does not (busy): not alive, yet never down."""
    clock = Clock()
    servers = ScriptedServers()
    cluster = ScriptedCluster({"a": up("a")})
    monitor = HostMonitor(store, cluster, servers=servers, down_after_s=5, clock=clock)
    await seed(store, servers, "a", a1="running")
    await monitor.run_once()
    cluster.statuses["a"] = replace(up("a"), alive=False, reachable=True)
    for _ in range(3):
        clock.now += 5
        await monitor.run_once()
    assert await states(store) == {"a1": "running"}
    host_a = await store.get_host("a")
    assert host_a is not None and host_a.state == "up"
