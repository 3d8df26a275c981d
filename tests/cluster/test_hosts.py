"""The Ray host side on a real 2-node Ray cluster: host agents start their servers, report
status, guard them with a key, and survive their node's death (issue 18).

No VM boots here (tests/cluster's other modules boot them); each host runs a real
``emberbox serve`` on its own data dir, network block and port.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from emberbox.cluster.hosts import Cluster, HostStatus, start_host, stop_host
from emberbox.cluster.monitor import HostMonitor
from emberbox.config import Settings
from emberbox.errors import HostDown, HostError
from emberbox.store import Store
from tests.support.paths import REPO, short_tmp_dir
from tests.support.raycluster import RayCluster, running_ray_cluster
from tests.support.rows import make_row

pytestmark = pytest.mark.anyio
HOSTS = ("h1", "h2")
SPARE = "h3"  # a node with no host started: for a start that fails
NETWORKS = {"h1": "10.223.0.0/16", "h2": "10.224.0.0/16"}  # one block per host server
DEATH_WAIT_S = 30.0  # the bound: lost within 30 s of a node's death
BACK_WAIT_S = 120.0


def pids_with_env(text: str) -> list[int]:
    """Processes whose environment contains ``text`` (the host servers of a data dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            with contextlib.suppress(OSError):
                if text.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def data_root() -> Iterator[Path]:
    root = short_tmp_dir("ebhosts-")
    try:
        yield root
    finally:
        for pid in pids_with_env(f"EMBERBOX_DATA_DIR={root}"):  # a server that outlived all
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


def host_env(name: str, data_root: Path) -> dict[str, str]:
    """A host server's settings: the shared images, its own cache and network block."""
    return {
        "EMBERBOX_IMAGES_DIR": str(Settings().images_dir),  # as the other suites use it
        "EMBERBOX_CACHE_DIR": str(data_root / name / "cache"),
        "EMBERBOX_NETWORK_CIDR": NETWORKS[name],
        "EMBERBOX_POOL_SIZE": "0",
        "EMBERBOX_MAX_SANDBOXES": "3",
    }


@pytest.fixture(scope="module")
def ray_cluster(data_root: Path) -> Iterator[RayCluster]:
    """Two host nodes, each with its host agent and server; stopped at the end."""
    with running_ray_cluster((*HOSTS, SPARE)) as cluster:
        cluster.connect()
        try:
            for name in HOSTS:
                start_host(name, data_root / name, env=host_env(name, data_root))
            yield cluster
        finally:
            for name in HOSTS:
                with contextlib.suppress(Exception):
                    stop_host(name)


@pytest.fixture
async def hosts(ray_cluster: RayCluster) -> AsyncIterator[Cluster]:
    cluster = await Cluster.connect(Settings(cluster_address=ray_cluster.address))
    yield cluster  # (close() would disconnect the module's driver)


async def state_of(store: Store, sandbox_id: str) -> str:
    row = await store.get(sandbox_id)
    assert row is not None
    return row.state


async def by_name(cluster: Cluster) -> dict[str, HostStatus]:
    return {status.name: status for status in await cluster.hosts()}


async def test_both_hosts_report_status(hosts: Cluster, ray_cluster: RayCluster) -> None:
    """Each host is alive on its own node's address, with its settings' limit and images."""
    statuses = await by_name(hosts)
    assert sorted(statuses) == list(HOSTS)
    for name, status in statuses.items():
        assert status.alive and not status.draining
        assert status.url is not None and status.url.startswith(
            f"http://{ray_cluster.node_ip(name)}:"
        )
        assert status.node_id == ray_cluster.node_id(name)
        assert (status.sandboxes, status.max_sandboxes) == (0, 3)
        assert status.free_memory_mib > 0
        assert "default" in status.images
    assert statuses["h1"].url != statuses["h2"].url


async def test_endpoint_needs_its_key(hosts: Cluster, data_root: Path) -> None:
    """The host server answers its admin key and refuses a call without it or with another's."""
    one, two = await hosts.endpoint("h1"), await hosts.endpoint("h2")
    assert one.key != two.key
    async with httpx.AsyncClient(base_url=one.url, timeout=10) as client:
        good = await client.get("/v1/sandboxes", headers={"Authorization": f"Bearer {one.key}"})
        assert good.status_code == 200 and good.json()["sandboxes"] == []
        assert (await client.get("/v1/sandboxes")).status_code == 401
        wrong = await client.get("/v1/sandboxes", headers={"Authorization": f"Bearer {two.key}"})
        assert wrong.status_code == 401
    log = (data_root / "h1" / "host-server.log").read_text(errors="replace")
    assert one.key not in log


async def test_drain_is_reported_and_kept(hosts: Cluster) -> None:
    """Draining a host shows in its status; undoing it too."""
    await hosts.drain("h2", True)
    assert (await hosts.status("h2")).draining
    await hosts.drain("h2", False)
    assert not (await hosts.status("h2")).draining


async def test_node_death_and_return(
    hosts: Cluster, ray_cluster: RayCluster, tmp_path: Path
) -> None:
    """Kill h1's node: within 30 s the monitor has h1 down and its sandbox lost (h2's
    untouched), Ray has its node dead and its server is gone; a new node for h1: the actor
    restarts, serves again with a new key (the stale endpoint is not served), and the
    monitor marks it up."""
    async with await Store.open(tmp_path / "index.db") as store:
        monitor = HostMonitor(store, hosts, sync_every=1000)  # no periodic sync here
        await monitor.run_once()  # both hosts known and up
        for sandbox_id, host in (("x1", "h1"), ("x2", "h2")):
            await store.insert(make_row(sandbox_id, state="running", host=host))
        before = await hosts.endpoint("h1")
        old_node = ray_cluster.node_id("h1")
        killed_at = ray_cluster.kill_node("h1")
        while await state_of(store, "x1") != "lost":
            assert time.monotonic() - killed_at < DEATH_WAIT_S, "h1's sandbox not lost"
            await monitor.run_once()
            await anyio.sleep(0.5)
        print(f"h1's sandbox lost {time.monotonic() - killed_at:.1f} s after the kill")
        assert await state_of(store, "x2") == "running"
        assert [(h.name, h.state) for h in await store.list_hosts()] == [
            ("h1", "down"),
            ("h2", "up"),
        ]
        statuses = await by_name(hosts)
        assert not statuses["h1"].alive and statuses["h1"].node_id == old_node
        assert statuses["h2"].alive
        while old_node not in await hosts.dead_nodes():
            assert time.monotonic() - killed_at < DEATH_WAIT_S, "Ray has h1's node alive"
            await anyio.sleep(0.5)
        print(f"h1's node dead for Ray {time.monotonic() - killed_at:.1f} s after the kill")
        async with httpx.AsyncClient(timeout=5) as client:
            with pytest.raises(httpx.TransportError):  # PR_SET_PDEATHSIG took the server down
                await client.get(f"{before.url}/healthz")

        ray_cluster.restart_node("h1")
        restarted_at = time.monotonic()
        while not (status := await hosts.status("h1")).alive:
            assert time.monotonic() - restarted_at < BACK_WAIT_S, "h1 did not come back"
            await anyio.sleep(0.5)
        print(f"h1 serving again {time.monotonic() - restarted_at:.1f} s after its node came back")
        assert status.node_id == ray_cluster.node_id("h1") != old_node
        after = await hosts.endpoint("h1")
        assert after.key != before.key
        headers = {"Authorization": f"Bearer {after.key}"}
        async with httpx.AsyncClient(base_url=after.url, headers=headers, timeout=10) as client:
            assert (await client.get("/v1/sandboxes")).status_code == 200
        await monitor.run_once()
        row = await store.get_host("h1")
        assert row is not None and (row.state, row.url) == ("up", after.url)
        assert await state_of(store, "x1") == "lost"  # h1 does not know it: it stays lost


async def test_a_dead_server_is_restarted(hosts: Cluster, data_root: Path) -> None:
    """h2's server is killed on its own: the actor ends, Ray restarts it with a new server
    (new URL and key) on the same data dir."""
    before = await hosts.endpoint("h2")
    servers = pids_with_env(f"EMBERBOX_DATA_DIR={data_root / 'h2'}")
    assert len(servers) == 1
    os.kill(servers[0], signal.SIGKILL)
    killed_at = time.monotonic()
    while True:
        status = await hosts.status("h2")
        if status.alive and status.url != before.url:
            break
        assert time.monotonic() - killed_at < BACK_WAIT_S, "h2 did not come back"
        await anyio.sleep(0.5)
    print(f"h2 serving again {time.monotonic() - killed_at:.1f} s after its server was killed")
    after = await hosts.endpoint("h2")
    assert after.key != before.key
    assert pids_with_env(f"EMBERBOX_DATA_DIR={data_root / 'h2'}") != servers


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", "import sys; from emberbox.cli import main; sys.exit(main())"]
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=120, cwd=REPO, check=False
    )


async def test_cli_host_start(hosts: Cluster, ray_cluster: RayCluster, data_root: Path) -> None:
    """`emberbox cluster host start` finds a running host (idempotent, prints its URL, not its
    key) and refuses, in one line, a host whose resource no node offers."""
    address = ["--address", ray_cluster.address]
    again = run_cli(
        "cluster", "host", "start", "--name", "h2", "--data-dir", str(data_root / "h2"), *address
    )
    assert again.returncode == 0, again.stderr
    endpoint = await hosts.endpoint("h2")
    assert endpoint.url in again.stdout and endpoint.key not in again.stdout + again.stderr
    nowhere = run_cli(
        "cluster", "host", "start", "--name", "h9", "--data-dir", str(data_root / "h9"), *address
    )
    assert nowhere.returncode != 0
    assert "emberbox_host_h9" in nowhere.stderr and "Traceback" not in nowhere.stderr


async def test_a_host_that_cannot_start_says_why(
    hosts: Cluster, ray_cluster: RayCluster, data_root: Path
) -> None:
    """A host server that refuses its settings: start_host raises HostError with the
    server's own reason, and no host is left registered."""
    bad = {"EMBERBOX_IMAGES_DIR": str(Settings().images_dir), "EMBERBOX_ACCEL": "warp-drive"}
    with pytest.raises(HostError, match="exited at start") as caught:
        start_host(SPARE, data_root / SPARE, env=bad, timeout_s=60)
    assert "warp-drive" in str(caught.value)  # the server's own complaint, from its log
    assert SPARE not in await hosts.names()


async def test_host_stop_and_start_again(hosts: Cluster, data_root: Path) -> None:
    """A host stopped for good is down (its endpoint a HostDown); started again, the same
    Cluster finds the new actor (no stale handle)."""
    assert (await hosts.status("h2")).alive
    stop_host("h2")
    assert not (await hosts.status("h2")).alive
    with pytest.raises(HostDown):
        await hosts.endpoint("h2")
    start_host("h2", data_root / "h2", env=host_env("h2", data_root))
    status = await hosts.status("h2")
    assert status.alive
    endpoint = await hosts.endpoint("h2")
    assert endpoint.url == status.url
