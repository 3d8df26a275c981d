"""Hostile tenants against a real server: another tenant's ids on every route of the live
OpenAPI, quotas, a revoked key, a 2,000-request burst, and the audit trail they leave.

Tenant A owns a running sandbox, a background process, a file and a snapshot. Tenant B
tries every route that takes an id with A's ids: each answer must be exactly the answer
for an unknown id, and A's objects must be unchanged. New routes are covered because the
routes are read from ``/openapi.json``.
"""

from __future__ import annotations

import json
import re
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from emberbox.service.tenancy import keys
from emberbox.store import tenants
from emberbox.store.db import connect
from tests.support.hostile import HostileCase, HostileServer

pytestmark = [pytest.mark.vm]

RATE_PER_S, BURST = 20, 150
SERVER_ENV = {
    "EMBERBOX_RATE_LIMIT_PER_S": str(RATE_PER_S),
    "EMBERBOX_RATE_LIMIT_BURST": str(BURST),
}
METHODS = {"get", "put", "post", "delete", "patch"}
OWNED_FILE = "/tmp/owned.txt"
BURST_REQUESTS = 2000


@dataclass(frozen=True)
class Owned:
    """Tenant A's objects."""

    key: str
    sandbox_id: str
    snapshot_id: str
    pid: int


def new_key(server: HostileServer, name: str, *, admin: bool = False, **quotas: int) -> str:
    """A key for tenant ``name``, made in the server's database while it runs."""
    conn = connect(server.data_dir / "emberbox.db")
    try:
        return keys.create_key(conn, name, admin=admin, quotas=quotas).key
    finally:
        conn.close()


def revoke(server: HostileServer, name: str) -> None:
    conn = connect(server.data_dir / "emberbox.db")
    try:
        keys.revoke(conn, name)
    finally:
        conn.close()


@pytest.fixture(scope="module", autouse=True)
def admin(server: HostileServer) -> Iterator[str]:
    """An admin key; at the end every key is revoked, so the server is back in local
    mode and the fixtures' keyless clean-up sees (and kills) every sandbox."""
    key = new_key(server, "root", admin=True)
    yield key
    conn = connect(server.data_dir / "emberbox.db")
    try:
        for tenant in {k.tenant_id for k in tenants.list_keys(conn)}:
            row = tenants.get_tenant(conn, tenant)
            assert row is not None
            keys.revoke(conn, row.name)
    finally:
        conn.close()


@pytest.fixture(scope="module")
def owned(server: HostileServer) -> Iterator[Owned]:
    """Tenant A: a sandbox with a background process and a file, and a snapshot of it."""
    key = new_key(server, "tenant-a")
    with server.client(key) as client:
        sandbox_id = server.create(client, metadata={"owner": "a"})
        url = f"/v1/sandboxes/{sandbox_id}"
        assert (
            client.put(f"{url}/files", params={"path": OWNED_FILE}, content=b"A").status_code == 200
        )
        started = client.post(f"{url}/processes", json={"cmd": "sleep 3600"})
        assert started.status_code == 201, started.text
        snapshot = client.post(f"{url}/snapshots")
        assert snapshot.status_code == 201, snapshot.text
        run = client.post(f"{url}/exec", json={"cmd": ["echo", "from-a"]})
        assert run.json()["stdout"] == "from-a\n"
        yield Owned(key, sandbox_id, snapshot.json()["id"], started.json()["pid"])
        client.delete(f"{url}")
        client.delete(f"/v1/snapshots/{snapshot.json()['id']}")


def _requests(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(method, path template, httpx arguments) of every operation with an owned id."""
    found = []
    for path, operations in spec["paths"].items():
        if "{sandbox_id}" not in path and "{snapshot_id}" not in path:
            continue
        for method, operation in operations.items():
            if method not in METHODS:
                continue
            kwargs: dict[str, Any] = {"params": {}}
            for param in operation.get("parameters", []):
                if param["in"] == "query" and param.get("required"):
                    kwargs["params"][param["name"]] = OWNED_FILE if param["name"] == "path" else "1"
            content = operation.get("requestBody", {}).get("content", {})
            if "application/json" in content:
                kwargs["json"] = {}
            elif content:
                kwargs["content"] = b"x"
            found.append((method.upper(), path, kwargs))
    return found


def _answer(response: httpx.Response, ids: dict[str, str]) -> tuple[int, str]:
    """Status and body with the ids written as their names (to compare two answers)."""
    text = response.text
    for name, value in ids.items():
        text = text.replace(value, f"<{name}>")
    return response.status_code, text


def test_another_tenants_ids_answer_as_unknown_ids_on_every_route(
    server: HostileServer, owned: Owned, admin: str, hostile_case: HostileCase
) -> None:
    """Tenant B gets, on every OpenAPI route with a sandbox or snapshot id, in bodies
    and queries, and on the terminal WebSocket, exactly the 404 of an unknown id; A's
    sandbox, process, file and snapshot are untouched."""
    b_key = new_key(server, "tenant-b")
    mine = {"sandbox_id": owned.sandbox_id, "snapshot_id": owned.snapshot_id}
    unknown = {"sandbox_id": secrets.token_hex(6), "snapshot_id": "snap-" + secrets.token_hex(6)}
    with hostile_case("another tenant's ids on every route", "tenant check (404)") as case:
        with server.client(b_key) as b:
            spec = b.get("/openapi.json").json()
            operations = _requests(spec)
            assert len(operations) >= 20, [f"{m} {p}" for m, p, _ in operations]
            for method, path, kwargs in operations:
                others = {"pid": owned.pid, "port": 8000, "path": "index.html"}
                foreign = b.request(method, path.format(**others, **mine), **kwargs)
                control = b.request(method, path.format(**others, **unknown), **kwargs)
                assert foreign.status_code == 404, (method, path, foreign.text)
                assert _answer(foreign, mine) == _answer(control, unknown), (method, path)
            _ids_in_bodies_and_queries(b, owned, unknown)
            assert owned.sandbox_id not in b.get("/v1/sandboxes").text
            assert b.get("/v1/snapshots").json() == {"snapshots": []}
        _terminal_refused(server, b_key, owned.sandbox_id, unknown["sandbox_id"])
        _owned_untouched(server, owned)
        with server.client(admin) as root:  # B's tries are audited, with their outcome
            tries = root.get("/v1/audit", params={"tenant": "tenant-b", "limit": 1000})
        assert {e["outcome"] for e in tries.json()["entries"]} == {"NotFound"}
        assert {"sandbox.kill", "terminal.open"} <= {e["action"] for e in tries.json()["entries"]}
        case.outcome = f"{len(operations)} operations + bodies + pty: all 404 as unknown ids"


def _ids_in_bodies_and_queries(b: httpx.Client, owned: Owned, unknown: dict[str, str]) -> None:
    fork = b.post("/v1/sandboxes", json={"snapshot_id": owned.snapshot_id})
    fork_unknown = b.post("/v1/sandboxes", json={"snapshot_id": unknown["snapshot_id"]})
    assert fork.status_code == 404
    assert _answer(fork, {"s": owned.snapshot_id}) == _answer(
        fork_unknown, {"s": unknown["snapshot_id"]}
    )
    seed = b.post("/exec/command", json={"vm_id": owned.sandbox_id, "command": "true"})
    seed_unknown = b.post("/exec/command", json={"vm_id": unknown["sandbox_id"], "command": "true"})
    assert seed.status_code == 404
    assert _answer(seed, {"s": owned.sandbox_id}) == _answer(
        seed_unknown, {"s": unknown["sandbox_id"]}
    )
    listed = b.get("/v1/snapshots", params={"sandbox_id": owned.sandbox_id})
    assert listed.json() == {"snapshots": []}


def _terminal_refused(server: HostileServer, key: str, sandbox_id: str, unknown_id: str) -> None:
    """The pty WebSocket closes with 4404 and the unknown id's message."""
    frames = []
    for target in (sandbox_id, unknown_id):
        url = server.url.replace("http://", "ws://") + f"/v1/sandboxes/{target}/pty"
        with ws_connect(url, additional_headers={"X-API-Key": key}) as ws:
            event = json.loads(ws.recv(timeout=30))
            with pytest.raises(ConnectionClosed):  # the error frame, then the close
                ws.recv(timeout=30)
            frames.append((event["error"]["message"].replace(target, "<id>"), ws.close_code))
    assert frames[0] == frames[1] == (frames[0][0], 4404), frames


def _owned_untouched(server: HostileServer, owned: Owned) -> None:
    with server.client(owned.key) as a:
        url = f"/v1/sandboxes/{owned.sandbox_id}"
        assert a.get(url).json()["state"] == "running"
        assert a.get(f"{url}/processes/{owned.pid}").json()["running"] is True
        assert a.get(f"{url}/files", params={"path": OWNED_FILE}).content == b"A"
        assert a.get(f"/v1/snapshots/{owned.snapshot_id}").status_code == 200
        assert a.post(f"{url}/exec", json={"cmd": "true"}).json()["exit_code"] == 0


def test_quotas_name_the_quota_and_hold_under_concurrency(
    server: HostileServer, hostile_case: HostileCase
) -> None:
    """Two concurrent creates for the last slot: one 201, one 403 max_sandboxes. Memory,
    vCPUs, snapshots and /v1/run are refused with 403 naming their quota."""
    key = new_key(server, "tenant-c", max_sandboxes=1, max_vcpus=1, max_memory_mib=600)
    with hostile_case("tenant quotas", "manager admission (403)") as case, server.client(key) as c:
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda _: c.post("/v1/sandboxes", json={}), range(2)))
        codes = sorted(r.status_code for r in answers)
        assert codes == [201, 403], [r.text for r in answers]
        created = next(r for r in answers if r.status_code == 201).json()["id"]
        refused = next(r for r in answers if r.status_code == 403).json()["error"]
        assert (refused["type"], refused["quota"]) == ("QuotaExceeded", "max_sandboxes")
        assert "max_sandboxes=1" in refused["message"]
        run = c.post("/v1/run", json={"language": "python3", "code": "print(1)"})
        assert (run.status_code, run.json()["error"].get("quota")) == (403, "max_sandboxes")
        assert c.delete(f"/v1/sandboxes/{created}").status_code == 204
        for body, quota in (({"memory_mib": 1024}, "max_memory_mib"), ({"vcpus": 2}, "max_vcpus")):
            answer = c.post("/v1/sandboxes", json=body)
            assert answer.status_code == 403, answer.text
            assert answer.json()["error"]["quota"] == quota
            assert quota in answer.json()["error"]["message"]
        case.outcome = "last slot raced: 201 + 403; memory, vcpus, run: 403 naming the quota"
    snapshots_key = new_key(server, "tenant-d", max_snapshots=0)
    with server.client(snapshots_key) as d:
        sandbox_id = server.create(d)
        try:
            snap = d.post(f"/v1/sandboxes/{sandbox_id}/snapshots")
            assert snap.status_code == 403, snap.text
            assert snap.json()["error"]["quota"] == "max_snapshots"
        finally:
            d.delete(f"/v1/sandboxes/{sandbox_id}")


def test_a_revoked_key_fails_on_its_next_request(server: HostileServer) -> None:
    """Revoked through the database while the server runs: 401 at once."""
    key = new_key(server, "tenant-e")
    with server.client(key) as e:
        assert e.get("/v1/sandboxes").status_code == 200
        revoke(server, "tenant-e")
        answer = e.get("/v1/sandboxes")
        assert answer.status_code == 401
        assert answer.json()["error"]["type"] == "Unauthorized"


def test_a_burst_of_2000_requests_is_limited_and_others_are_served(
    server: HostileServer, hostile_case: HostileCase, tmp_path: Path
) -> None:
    """2,000 requests as fast as 32 connections go from one key: 429s with Retry-After
    beyond its burst, while /healthz and another key keep answering promptly (their
    latency, measured from another process than the flood's, is printed)."""
    flood_key, other_key = new_key(server, "tenant-flood"), new_key(server, "tenant-other")
    with hostile_case("2,000-request burst from one key", "per-key token bucket (429)") as case:
        out = tmp_path / "flood.json"
        flood = subprocess.Popen(
            [sys.executable, "-c", FLOOD, server.url, flood_key, str(BURST_REQUESTS), str(out)]
        )
        try:
            health_s, other_s = _probe_while_running(server, other_key, flood)
        finally:
            if flood.poll() is None:
                flood.kill()
            flood.wait()
        assert flood.returncode == 0
        found = json.loads(out.read_text())
        statuses, elapsed = found["results"], found["elapsed"]
        limited = [s for s in statuses if s[0] == 429]
        ok = [s for s in statuses if s[0] == 200]
        assert len(limited) + len(ok) == BURST_REQUESTS, {s[0] for s in statuses}
        assert len(ok) <= BURST + RATE_PER_S * (elapsed + 1)
        assert len(limited) >= BURST_REQUESTS - BURST - RATE_PER_S * (elapsed + 1)
        assert all(re.fullmatch(r"[1-9][0-9]*", s[1]) for s in limited), limited[:3]
        assert all("rate limit exceeded" in s[2] for s in limited), limited[:3]
        summary = (
            f"{len(limited)} x 429, {len(ok)} x 200 in {elapsed:.1f} s; meanwhile /healthz "
            f"p50 {statistics.median(health_s) * 1000:.0f} ms max {max(health_s) * 1000:.0f} ms "
            f"({len(health_s)} probes), another key p50 "
            f"{statistics.median(other_s) * 1000:.0f} ms max {max(other_s) * 1000:.0f} ms "
            f"({len(other_s)} probes)"
        )
        print(summary)
        assert len(health_s) >= 3 and len(other_s) >= 3, summary
        assert max(health_s) < 2.0 and max(other_s) < 2.0, summary
        case.outcome = summary


FLOOD = """
import asyncio, json, sys, time
import httpx

url, key, count, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
WORKERS = 32
results = []

async def worker(n):
    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": key}) as client:
        for _ in range(n):
            answer = await client.get("/v1/sandboxes", timeout=60)
            message = answer.json()["error"]["message"] if answer.status_code != 200 else ""
            results.append((answer.status_code, answer.headers.get("retry-after", ""), message))

async def main():
    started = time.monotonic()
    shares = [count // WORKERS + (i < count % WORKERS) for i in range(WORKERS)]
    await asyncio.gather(*(worker(n) for n in shares))
    with open(out, "w") as file:
        json.dump({"elapsed": time.monotonic() - started, "results": results}, file)

asyncio.run(main())
"""


def _probe_while_running(
    server: HostileServer, other_key: str, flood: subprocess.Popen[bytes]
) -> tuple[list[float], list[float]]:
    """Latencies of /healthz and of another key's listing while the flood runs."""
    health_s: list[float] = []
    other_s: list[float] = []
    with httpx.Client(base_url=server.url, timeout=30) as client:
        while flood.poll() is None:
            for path, headers, into in (
                ("/healthz", {}, health_s),
                ("/v1/sandboxes", {"X-API-Key": other_key}, other_s),
            ):
                started = time.monotonic()
                answer = client.get(path, headers=headers)
                into.append(time.monotonic() - started)
                assert answer.status_code == 200, answer.text
            time.sleep(0.05)
    return health_s, other_s


def test_tenant_calls_are_in_the_audit_log(server: HostileServer, owned: Owned, admin: str) -> None:
    """A's create, file write, process start, snapshot and exec are audited under A's
    tenant and key."""
    with server.client(admin) as root:
        entries = root.get("/v1/audit", params={"tenant": "tenant-a", "limit": 1000}).json()
    seen = {(e["action"], e["outcome"]) for e in entries["entries"]}
    for action in ("sandbox.create", "file.write", "process.start", "snapshot.create"):
        assert (action, "ok") in seen, seen
    execs = [e for e in entries["entries"] if e["action"] == "sandbox.exec"]
    assert any(e["detail"].get("cmd") == ["echo", "from-a"] for e in execs), execs
    key_id = owned.key.split("_")[1]
    assert {e["key_id"] for e in entries["entries"]} == {key_id}
    assert {e["tenant"] for e in entries["entries"]} == {"tenant-a"}
