"""Two API replicas on one PostgreSQL (issue 18): they agree on every sandbox, tenancy
holds across them, and restarting one in the middle of a workload loses nothing."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest

from emberbox import errors
from emberbox.sdk import Sandbox
from tests.support.cluster_rig import HOSTS, Rig

pytestmark = [pytest.mark.vm]
WORKLOAD_AFTER_RESTART = 10  # exec rounds on each replica once the restarted one is back


@pytest.fixture
def made(rig: Rig) -> Iterator[list[Sandbox]]:
    """Sandboxes a test makes (append them); killed afterwards through replica 1. First,
    the hosts' reports catch up with the sandboxes killed before (placement under that
    lag is test_cluster_placement.py's subject)."""
    rig.wait_hosts_report(HOSTS)
    sandboxes: list[Sandbox] = []
    try:
        yield sandboxes
    finally:
        for sb in sandboxes:
            again = Sandbox(sb.id, url=rig.replicas[1].url, api_key=rig.keys["alice"])
            again.kill()
            again.close()
            sb.close()


def test_replicas_agree(rig: Rig, made: list[Sandbox]) -> None:
    """Made on replica 0, it runs commands and is killed through replica 1; both list it
    with the same state all along."""
    key = rig.keys["alice"]
    sb = Sandbox.create(url=rig.replicas[0].url, api_key=key, metadata={"suite": "agree"})
    made.append(sb)
    other = Sandbox.connect(sb.id, url=rig.replicas[1].url, api_key=key)
    try:
        assert other.commands.run("echo from-1").stdout == "from-1\n"
        for url in (rig.replicas[0].url, rig.replicas[1].url):
            listed = Sandbox.list(metadata={"suite": "agree"}, url=url, api_key=key)
            assert [(s.id, s.state) for s in listed] == [(sb.id, "running")]
        other.kill()
        assert sb.info().state == "stopped"  # replica 0 sees replica 1's kill
        assert rig.host_of(sb.id)[1] == "stopped"
        with pytest.raises(errors.Conflict):
            sb.commands.run("true")
    finally:
        other.close()


def test_tenancy_holds_across_replicas(rig: Rig, made: list[Sandbox]) -> None:
    """alice's sandbox from replica 0 is an unknown id to bob on replica 1 (get, exec,
    files, delete: 404), bob's list does not show it, and it keeps running."""
    sb = Sandbox.create(url=rig.replicas[0].url, api_key=rig.keys["alice"])
    made.append(sb)
    with rig.client(rig.keys["bob"], replica=1) as bob:
        for method, path in (
            ("GET", ""),
            ("POST", "/exec"),
            ("GET", "/files?path=/etc/hostname"),
            ("DELETE", ""),
        ):
            body = {"cmd": ["true"]} if path == "/exec" else None
            answer = bob.request(method, f"/v1/sandboxes/{sb.id}{path}", json=body)
            assert answer.status_code == 404, (method, path, answer.text)
        assert sb.id not in {s["id"] for s in bob.get("/v1/sandboxes").json()["sandboxes"]}
    with rig.admin(replica=1) as admin:  # the admin sees it, on the other replica too
        assert admin.get(f"/v1/sandboxes/{sb.id}").json()["state"] == "running"
    assert sb.commands.run("echo still").stdout == "still\n"


@dataclass(frozen=True)
class Call:
    started: float  # time.monotonic()
    outcome: str  # "ok", an HTTP status, or "transport:<httpx error>"


def test_replica_restart_mid_workload(rig: Rig, made: list[Sandbox]) -> None:
    """Two threads exec in a loop, one per replica, while replica 0 is killed (SIGKILL)
    and started again on its port: no sandbox is lost and no call is answered with a
    5xx; replica 1 never fails; of replica 0's calls, at most the one in flight at the
    kill fails, the calls made while it is down fail to connect (a load balancer's
    cue), and every call after its restart succeeds."""
    key = rig.keys["alice"]
    for _ in range(2):
        made.append(Sandbox.create(url=rig.replicas[0].url, api_key=key))
    calls: dict[int, list[Call]] = {0: [], 1: []}
    stop = threading.Event()

    def workload(replica: int) -> None:
        with rig.client(key, replica) as client:
            while not stop.is_set():
                sandbox_id = made[len(calls[replica]) % len(made)].id
                started = time.monotonic()
                try:
                    answer = client.post(
                        f"/v1/sandboxes/{sandbox_id}/exec", json={"cmd": ["echo", "ok"]}
                    )
                    ok = answer.status_code == 200 and answer.json()["stdout"] == "ok\n"
                    outcome = "ok" if ok else str(answer.status_code)
                except httpx.TransportError as exc:  # refused, or cut by the kill
                    outcome = f"transport:{type(exc).__name__}"
                    time.sleep(0.05)
                calls[replica].append(Call(started, outcome))

    def oks(replica: int, since: float = 0.0) -> int:
        return sum(c.outcome == "ok" for c in calls[replica] if c.started >= since)

    threads = [threading.Thread(target=workload, args=(r,), daemon=True) for r in (0, 1)]
    for thread in threads:
        thread.start()
    try:
        _wait_for(lambda: oks(0) >= 3 and oks(1) >= 3, 120)
        killed_at = time.monotonic()
        rig.replicas[0].kill()
        _wait_for(lambda: any(c.started > killed_at for c in calls[0]), 60)
        rig.replicas[0].start()
        back_at = time.monotonic()
        _wait_for(lambda: min(oks(0, back_at), oks(1, back_at)) >= WORKLOAD_AFTER_RESTART, 180)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    tally = {r: Counter(c.outcome for c in calls[r]) for r in (0, 1)}
    print(f"workload outcomes per replica {tally}")
    assert set(tally[1]) == {"ok"}, tally[1]
    before = [c for c in calls[0] if c.started < killed_at and c.outcome != "ok"]
    assert len(before) <= 1, before  # the call in flight at the kill, if any
    down = [c for c in calls[0] if killed_at <= c.started < back_at]  # (it may be up)
    assert any(c.outcome.startswith("transport:") for c in down), down
    assert all(c.outcome == "ok" or c.outcome.startswith("transport:") for c in down), down
    after = [c for c in calls[0] if c.started >= back_at]
    assert after and all(c.outcome == "ok" for c in after), Counter(c.outcome for c in after)
    for url in (rig.replicas[0].url, rig.replicas[1].url):
        for sb in made:
            seen = Sandbox(sb.id, url=url, api_key=key)
            try:
                assert seen.info().state == "running"
            finally:
                seen.close()
    assert all(rig.host_of(sb.id)[1] == "running" for sb in made)


def _wait_for(condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the workload"
        time.sleep(0.1)
