"""Sandbox networking through a real server: default deny, full egress, allowlists, and
cleanup (real VMs, real namespaces, real nftables).

Every target is a network namespace these tests make on this machine
(:mod:`tests.support.network`), with a veth to the host and a route to it, listening on
TCP: nothing leaves the machine. Each target is first reached from the host itself, so
an unreachable target is the sandbox's rules at work and not a target that does not
listen.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from emberbox.images.registry import ImageInfo
from emberbox.net.addresses import host_veth_name, namespace_name
from tests.support.network import (
    BANNER,
    OTHER_PUBLIC_TARGET,
    PUBLIC_TARGET,
    probe,
    reached,
    run,
    sh,
    target_namespace,
)
from tests.support.paths import pids_mentioning, short_tmp_dir
from tests.support.servers import Server, serve_emberbox

pytestmark = [pytest.mark.vm]

NETWORK_CIDR = "10.215.0.0/16"  # this module's servers (the hostile suite uses another)


# --- sandboxes ----------------------------------------------------------------------------


def create(client: httpx.Client, network: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {} if network is None else {"network": network}
    response = client.post("/v1/sandboxes", json=body)
    assert response.status_code == 201, response.text
    record: dict[str, Any] = response.json()
    return record


def network_leftovers(server: Server, sandbox_id: str) -> list[str]:
    """What of the sandbox's network is still on the host (namespace, veth, record)."""
    found = []
    if Path("/run/netns", namespace_name(sandbox_id)).exists():
        found.append(f"namespace {namespace_name(sandbox_id)}")
    if Path("/sys/class/net", host_veth_name(sandbox_id)).exists():
        found.append(f"veth {host_veth_name(sandbox_id)}")
    if (server.settings.data_dir / "net" / f"{sandbox_id}.json").exists():
        found.append("record")
    return found


@pytest.fixture(scope="module")
def server(default_image: ImageInfo) -> Iterator[Server]:
    data_dir = short_tmp_dir("eb-net-")
    try:
        with serve_emberbox(
            data_dir, EMBERBOX_NETWORK_CIDR=NETWORK_CIDR, EMBERBOX_POOL_SIZE="0"
        ) as s:
            yield s
    finally:
        subprocess.run(["rm", "-rf", str(data_dir)], check=False)


@pytest.fixture(scope="module")
def public_target() -> Iterator[str]:
    with target_namespace(PUBLIC_TARGET, [8080, 8081]) as address:
        yield address


@pytest.fixture(scope="module")
def other_public_target() -> Iterator[str]:
    with target_namespace(OTHER_PUBLIC_TARGET, [8080]) as address:
        yield address


# --- tests --------------------------------------------------------------------------------


def test_no_network_by_default(server: Server, public_target: str) -> None:
    """A sandbox that asks for nothing has no address, no route and reaches nothing."""
    with server.client() as client:
        sandbox = create(client)
        assert sandbox["ip_address"] is None
        assert sh(client, sandbox["id"], "ip -4 route")["stdout"] == ""  # no route at all
        link = sh(client, sandbox["id"], "ip -o link show eth0")["stdout"]
        assert "state DOWN" in link, link
        [answer] = probe(client, sandbox["id"], [(public_target, 8080)])
        assert not reached(answer)
        assert "unreachable" in answer.lower(), answer
        client.delete(f"/v1/sandboxes/{sandbox['id']}")


def test_full_egress_reaches_a_public_target(server: Server, public_target: str) -> None:
    """egress full: the guest has the reported address and reaches a public target."""
    with server.client() as client:
        sandbox = create(client, {"egress": "full"})
        address = sandbox["ip_address"]
        assert address and address.startswith("10.215."), sandbox
        assert client.get(f"/v1/sandboxes/{sandbox['id']}").json()["ip_address"] == address
        shown = sh(client, sandbox["id"], "ip -4 -o address show eth0")["stdout"]
        assert f"inet {address}/30" in shown, shown
        answers = probe(client, sandbox["id"], [(public_target, 8080), (public_target, 8081)])
        assert answers == [f"{BANNER} {public_target}:8080", f"{BANNER} {public_target}:8081"]
        client.delete(f"/v1/sandboxes/{sandbox['id']}")
        assert network_leftovers(server, sandbox["id"]) == []


def test_allowlist_passes_only_the_listed_destination(
    server: Server, public_target: str, other_public_target: str
) -> None:
    """allowlist host:port: that port of that host passes; its other port and another
    host do not."""
    with server.client() as client:
        allow = {"egress": "allowlist", "allow": [f"{public_target}:8080"]}
        sandbox = create(client, allow)
        targets = [(public_target, 8080), (public_target, 8081), (other_public_target, 8080)]
        answers = probe(client, sandbox["id"], targets)
        assert reached(answers[0]), answers
        assert not reached(answers[1]) and not reached(answers[2]), answers
        assert all("timed out" in a for a in answers[1:]), answers  # dropped, not refused
        client.delete(f"/v1/sandboxes/{sandbox['id']}")


def test_two_sandboxes_get_different_addresses_and_bad_entries_are_400(server: Server) -> None:
    """Addresses are unique among live sandboxes; a bad allow entry is a 400 naming it."""
    with server.client() as client:
        first = create(client, {"egress": "allowlist", "allow": []})
        second = create(client, {"egress": "full"})
        assert first["ip_address"] != second["ip_address"]
        for entry in ["1.2.3.4:99999", "not a host", "::1", "10.0.0.0/33"]:
            bad = client.post(
                "/v1/sandboxes", json={"network": {"egress": "allowlist", "allow": [entry]}}
            )
            assert bad.status_code == 400, bad.text
            assert entry in bad.json()["error"]["message"], bad.text
        mixed = client.post(
            "/v1/sandboxes", json={"network": {"egress": "full", "allow": ["1.1.1.1"]}}
        )
        assert mixed.status_code == 400, mixed.text
        for sandbox in (first, second):
            client.delete(f"/v1/sandboxes/{sandbox['id']}")


def test_kill_pause_and_resume_clean_up_the_network(server: Server, public_target: str) -> None:
    """Pause removes the namespace (resume makes it again, same address, working); kill
    leaves no namespace, veth, nft table or record behind."""
    with server.client() as client:
        sandbox = create(client, {"egress": "full"})
        sandbox_id, address = sandbox["id"], sandbox["ip_address"]
        name = namespace_name(sandbox_id)
        tables = run("ip", "netns", "exec", name, "nft", "list", "tables")
        assert "inet emberbox" in tables
        assert client.post(f"/v1/sandboxes/{sandbox_id}/pause").status_code == 200
        assert network_leftovers(server, sandbox_id) == ["record"]
        resumed = client.post(f"/v1/sandboxes/{sandbox_id}/resume")
        assert resumed.status_code == 200, resumed.text
        assert resumed.json()["ip_address"] == address
        assert reached(probe(client, sandbox_id, [(public_target, 8080)])[0])
        client.delete(f"/v1/sandboxes/{sandbox_id}")
        assert network_leftovers(server, sandbox_id) == []
        assert name not in run("ip", "netns", "list")


def test_ttl_expiry_removes_the_network(server: Server) -> None:
    """The TTL reaper's kill takes the sandbox's network with it."""
    with server.client() as client:
        response = client.post(
            "/v1/sandboxes", json={"network": {"egress": "full"}, "timeout_s": 2}
        )
        assert response.status_code == 201, response.text
        sandbox_id = response.json()["id"]
        deadline = time.monotonic() + 30
        while client.get(f"/v1/sandboxes/{sandbox_id}").json()["state"] != "stopped":
            assert time.monotonic() < deadline, "the sandbox did not expire"
            time.sleep(0.2)
        assert network_leftovers(server, sandbox_id) == []


def test_server_crash_reattaches_or_sweeps_networks(
    default_image: ImageInfo, public_target: str
) -> None:
    """After SIGKILL of the server: a sandbox whose VMM lived on keeps its network (and
    loses it at kill); one whose VMM died has its namespace, veth and record removed."""
    data_dir = short_tmp_dir("eb-netcrash-")
    env = {"EMBERBOX_NETWORK_CIDR": "10.217.0.0/16", "EMBERBOX_POOL_SIZE": "0"}
    try:
        with serve_emberbox(data_dir, **env) as first, first.client() as client:
            alive = create(client, {"egress": "full"})["id"]
            doomed = create(client, {"egress": "full"})["id"]
            first.process.kill()
            first.process.wait()
            for pid in pids_mentioning(f"emberbox-{doomed}"):
                subprocess.run(["kill", "-9", str(pid)], check=False)
        with serve_emberbox(data_dir, **env) as second, second.client() as client:
            states = {s["id"]: s["state"] for s in client.get("/v1/sandboxes").json()["sandboxes"]}
            assert (states[alive], states[doomed]) == ("running", "error")
            assert network_leftovers(second, doomed) == []
            assert reached(probe(client, alive, [(public_target, 8080)])[0])
            client.delete(f"/v1/sandboxes/{alive}")
            assert network_leftovers(second, alive) == []
    finally:
        subprocess.run(["rm", "-rf", str(data_dir)], check=False)


def test_forks_of_a_networked_snapshot_get_their_own_network(
    server: Server, public_target: str
) -> None:
    """A fork without network has its NIC down and no route; a networked fork gets its
    own new address (not the snapshot's) and reaches the target."""
    with server.client() as client:
        source = create(client, {"egress": "full"})
        snap = client.post(f"/v1/sandboxes/{source['id']}/snapshots")
        assert snap.status_code in (200, 201), snap.text
        snapshot_id = snap.json()["id"]
        bare = client.post("/v1/sandboxes", json={"snapshot_id": snapshot_id})
        assert bare.status_code == 201, bare.text
        bare_id = bare.json()["id"]
        assert bare.json()["ip_address"] is None
        assert sh(client, bare_id, "ip -4 route")["stdout"] == ""
        assert "state DOWN" in sh(client, bare_id, "ip -o link show eth0")["stdout"]
        body = {"snapshot_id": snapshot_id, "network": {"egress": "full"}}
        forked = client.post("/v1/sandboxes", json=body)
        assert forked.status_code == 201, forked.text
        fork_id, fork_ip = forked.json()["id"], forked.json()["ip_address"]
        assert fork_ip not in (None, source["ip_address"])
        shown = sh(client, fork_id, "ip -4 -o address show eth0")["stdout"]
        assert f"inet {fork_ip}/30" in shown and source["ip_address"] not in shown, shown
        assert reached(probe(client, fork_id, [(public_target, 8080)])[0])
        for sandbox_id in (source["id"], bare_id, fork_id):
            client.delete(f"/v1/sandboxes/{sandbox_id}")
        client.delete(f"/v1/snapshots/{snapshot_id}")
