"""The API replica (cluster mode) over two REAL host servers, one small VM on each.

The hosts are ``emberbox serve`` processes with their own data dirs and admin keys; only
Ray is faked (:class:`tests.support.fakes_cluster.FakeCluster`); the replica is the real
``create_cluster_app`` under uvicorn, its index in its own SQLite store (the PostgreSQL
runs are tests/cluster's). Clients talk to the replica only, through the SDK and HTTP.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from emberbox import errors
from emberbox.api.cluster import create_cluster_app
from emberbox.config import Settings
from emberbox.images.registry import ImageInfo
from emberbox.sdk import Sandbox
from tests.support.fakes_cluster import FakeCluster, FakeHost
from tests.support.keys import make_key
from tests.support.paths import short_tmp_dir
from tests.support.servers import Server, serve_emberbox, serving

pytestmark = [pytest.mark.vm]

# One cold boot per host: no pool, no templates (each would boot more VMs).
HOST_ENV = {"EMBERBOX_POOL_SIZE": "0", "EMBERBOX_TEMPLATES": "false"}


@dataclass(frozen=True)
class Replica:
    url: str
    key: str  # the replica's admin key
    cluster: FakeCluster
    hosts: dict[str, Server]
    data_dir: Path

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key or self.key}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=300)


@pytest.fixture(scope="module")
def replica(default_image: ImageInfo) -> Iterator[Replica]:
    """Two hosts (max one sandbox each) behind one replica."""
    with ExitStack() as stack:
        cluster = FakeCluster()
        hosts: dict[str, Server] = {}
        for name in ("alpha", "beta"):
            data_dir = short_tmp_dir(f"eb-{name}-")
            stack.callback(_remove, data_dir)
            key = secrets.token_hex(16)
            server = stack.enter_context(serve_emberbox(data_dir, EMBERBOX_API_KEY=key, **HOST_ENV))
            hosts[name] = server
            cluster.add(FakeHost(name, server.url, key, max_sandboxes=1))
        replica_dir = short_tmp_dir("eb-replica-")
        stack.callback(_remove, replica_dir)
        admin = secrets.token_hex(16)
        settings = Settings(data_dir=replica_dir, api_key=SecretStr(admin))
        app = create_cluster_app(settings, cluster, monitor_interval_s=0)
        url = stack.enter_context(serving(app, lifespan=True))
        yield Replica(url, admin, cluster, hosts, replica_dir)


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _host_of(replica: Replica, sandbox_id: str) -> str:
    """Which host server knows the sandbox (asked with its own key, not the replica)."""
    found = []
    for name, server in replica.hosts.items():
        headers = {"Authorization": f"Bearer {replica.cluster.hosts_by_name[name].key}"}
        answer = httpx.get(f"{server.url}/v1/sandboxes/{sandbox_id}", headers=headers)
        if answer.status_code == 200:
            found.append(name)
    assert len(found) == 1, found
    return found[0]


def test_sandboxes_spread_work_through_the_replica_and_full_hosts_answer_503(
    replica: Replica, tmp_path: Path
) -> None:
    """Two creates land on the two hosts; exec (JSON and NDJSON), files streamed both
    ways, a terminal and the list work through the replica; a third create is a 503
    NoCapacity with Retry-After; a host that stops answering shows its sandbox lost."""
    url, key = replica.url, replica.key
    first = Sandbox.create(metadata={"suite": "cluster"}, url=url, api_key=key)
    second = Sandbox.create(metadata={"suite": "cluster"}, url=url, api_key=key)
    try:
        assert {_host_of(replica, first.id), _host_of(replica, second.id)} == {"alpha", "beta"}
        for sb in (first, second):
            assert sb.commands.run("echo $((6*7))").stdout == "42\n"
        streamed: list[str] = []
        result = second.commands.run("for i in 1 2 3; do echo $i; done", on_stdout=streamed.append)
        assert "".join(streamed) == "1\n2\n3\n" and result.exit_code == 0
        payload = os.urandom(3 << 20)  # 3 MiB: streamed up and down, byte for byte
        first.files.write("/tmp/blob", payload)
        assert first.files.read("/tmp/blob") == payload
        with first.pty.create(cmd="echo pty-$((40+2))") as term:
            assert b"pty-42" in b"".join(term)
        listed = {sb.id for sb in Sandbox.list(metadata={"suite": "cluster"}, url=url, api_key=key)}
        assert listed == {first.id, second.id}

        with pytest.raises(errors.NoCapacity) as full:
            Sandbox.create(url=url, api_key=key)
        assert full.value.retry_after_s >= 1
        with replica.client() as client:
            refused = client.post("/v1/sandboxes", json={})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"

        down = _host_of(replica, second.id)
        replica.cluster.hosts_by_name[down].down = True
        try:
            assert second.info().state == "lost"
            with pytest.raises(errors.HostDown):
                second.commands.run("true")
        finally:
            replica.cluster.hosts_by_name[down].down = False
        assert second.info().state == "running"  # back: the host's answer again
    finally:
        for sb in (first, second):
            sb.kill()
            sb.close()
    with replica.client() as client:
        for sb in (first, second):
            assert client.get(f"/v1/sandboxes/{sb.id}").json()["state"] == "stopped"


def test_admin_routes_drain_and_tenancy(replica: Replica) -> None:
    """The admin routes list and drain hosts (a tenant key gets 401); a drained host
    takes no sandbox; another tenant's sandbox is an unknown id."""
    alice = make_key(replica.data_dir, "--name", "alice")
    bob = make_key(replica.data_dir, "--name", "bob")
    with replica.client() as admin, replica.client(alice) as a, replica.client(bob) as b:
        hosts = admin.get("/v1/cluster/hosts").json()["hosts"]
        assert [h["name"] for h in hosts] == ["alpha", "beta"]
        assert all(h["alive"] and not h["draining"] for h in hosts)
        assert "url" not in json.dumps(hosts)
        assert a.get("/v1/cluster/hosts").status_code == 401
        drained = admin.post("/v1/cluster/hosts/alpha/drain", json={"drain": True}).json()
        assert [h["draining"] for h in drained["hosts"]] == [True, False]
        try:
            created = a.post("/v1/sandboxes", json={})
            assert created.status_code == 201, created.text
            sandbox_id = created.json()["id"]
            assert _host_of(replica, sandbox_id) == "beta"
            assert b.get(f"/v1/sandboxes/{sandbox_id}").status_code == 404
            exec_body = {"cmd": ["true"]}
            assert b.post(f"/v1/sandboxes/{sandbox_id}/exec", json=exec_body).status_code == 404
            assert [s["id"] for s in b.get("/v1/sandboxes").json()["sandboxes"]] == []
            assert a.delete(f"/v1/sandboxes/{sandbox_id}").status_code == 204
        finally:
            admin.post("/v1/cluster/hosts/alpha/drain", json={"drain": False})
        assert admin.get("/e2b/sandboxes").status_code == 501
