"""Placement on the real cluster: creates spread over the hosts, a full host is skipped,
and with every host full a create is refused with 503 and Retry-After (issue 18).

Each host's server takes at most MAX_PER_HOST sandboxes (EMBERBOX_MAX_SANDBOXES)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from tests.support.cluster_rig import HOSTS, MAX_PER_HOST, Rig

pytestmark = [pytest.mark.vm]
VIEW_LAG_S = 15.0


@pytest.fixture
def alice(rig: Rig) -> Iterator[httpx.Client]:
    """alice's client on replica 0, once the hosts have reported the kills of earlier
    tests; every sandbox alice has is killed afterwards. Creates then follow each other
    at once, as a client's do: placement must not overshoot a host meanwhile."""
    rig.wait_hosts_report(HOSTS)
    with rig.client(rig.keys["alice"]) as client:
        try:
            yield client
        finally:
            for sandbox in client.get("/v1/sandboxes").json()["sandboxes"]:
                if sandbox["state"] not in ("stopped", "error"):
                    client.delete(f"/v1/sandboxes/{sandbox['id']}")


def create(client: httpx.Client) -> str:
    made = client.post("/v1/sandboxes", json={"metadata": {"suite": "placement"}})
    assert made.status_code == 201, made.text
    sandbox_id: str = made.json()["id"]
    return sandbox_id


def hosts_view(rig: Rig) -> dict[str, dict[str, object]]:
    with rig.admin() as admin:
        listed = admin.get("/v1/cluster/hosts")
    assert listed.status_code == 200, listed.text
    return {host["name"]: host for host in listed.json()["hosts"]}


def settled_view(rig: Rig, counts: dict[str, int]) -> dict[str, dict[str, object]]:
    """The admin view once it shows ``counts`` sandboxes per host: hosts report their
    counts every second or so, so the view may lag a create by that much (polled, 15 s)."""
    deadline = time.monotonic() + VIEW_LAG_S
    while True:
        view = hosts_view(rig)
        if {name: view[name]["sandboxes"] for name in counts} == counts:
            return view
        assert time.monotonic() < deadline, f"the hosts view never showed {counts}: {view}"
        time.sleep(0.2)


def test_creates_spread_over_the_hosts(rig: Rig, alice: httpx.Client) -> None:
    """Three creates on an empty cluster land on three different hosts: the index says
    so, each VM is a QEMU under its host's data dir, and the admin view counts one each."""
    made = [create(alice) for _ in HOSTS]
    placed = {sandbox_id: rig.host_of(sandbox_id) for sandbox_id in made}
    assert sorted(host for host, _ in placed.values() if host) == sorted(HOSTS), placed
    assert all(state == "running" for _, state in placed.values()), placed
    for sandbox_id, (host, _) in placed.items():
        assert host is not None and sandbox_id in rig.vm_ids_on(host)
    view = settled_view(rig, dict.fromkeys(HOSTS, 1))
    assert sorted(view) == sorted(HOSTS)
    for name in HOSTS:
        assert view[name]["alive"] is True and view[name]["max_sandboxes"] == MAX_PER_HOST
        assert "url" not in view[name] and "key" not in view[name]  # never shown


def test_full_hosts_are_skipped_and_all_full_is_503(rig: Rig, alice: httpx.Client) -> None:
    """Filling the cluster puts exactly MAX_PER_HOST on each host; one more create is a
    503 with Retry-After (and no VM); freeing a slot on one host sends the next create
    there, past the two full ones."""
    made = [create(alice) for _ in range(MAX_PER_HOST * len(HOSTS))]
    per_host = Counter(rig.host_of(sandbox_id)[0] for sandbox_id in made)
    assert per_host == dict.fromkeys(HOSTS, MAX_PER_HOST), per_host
    vms_before = {name: rig.sandbox_vms_on(name) for name in HOSTS}

    refused = alice.post("/v1/sandboxes", json={})
    assert refused.status_code == 503, refused.text
    assert int(refused.headers["Retry-After"]) > 0
    assert refused.json()["error"]["type"] == "NoCapacity"
    assert {name: rig.sandbox_vms_on(name) for name in HOSTS} == vms_before

    freed = next(s for s in made if rig.host_of(s)[0] == "h2")
    assert alice.delete(f"/v1/sandboxes/{freed}").status_code == 204
    assert rig.host_of(freed)[1] == "stopped"
    settled_view(rig, {"h1": MAX_PER_HOST, "h2": MAX_PER_HOST - 1, "h3": MAX_PER_HOST})
    again = create(alice)
    assert rig.host_of(again) == ("h2", "running")
    assert again in rig.vm_ids_on("h2") and freed not in rig.vm_ids_on("h2")
