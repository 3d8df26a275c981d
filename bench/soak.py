"""Soak test (issue #15): a bounded run of hostile load against a real ``emberbox serve``.

Several tenants' clients at once mix create/exec/streaming/files/PTY/snapshot/kill,
while hostile guests (fork bomb, output flood, memory hog), stalled readers, half-sent
requests and oversized bodies run beside them. It reports requests served per
operation with p50/p99 latency, the 5xx count, the server's RSS at start/peak/end, its
fd count, and what is left after (VMMs, cgroups, nft rules, network namespaces, files),
writes ``bench/results/soak.json`` and exits non-zero when a bar is missed:

- zero 5xx answers;
- server RSS growth (peak over start) at most 64 MiB;
- the server's fd count back to its baseline once every sandbox is gone;
- nothing left behind.

``make soak`` runs it for 120 s; ``tests/hostile/test_soak.py`` runs a short form.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import websockets

from emberbox.service.tenancy import keys
from emberbox.service.vm.spares import MAX_SPARES
from emberbox.store.db import connect
from tests.support.hostile import host_cgroups
from tests.support.paths import pids_mentioning, qemu_pids_under, short_tmp_dir
from tests.support.servers import Server, serve_emberbox

MIB = 1 << 20
RESULTS = Path(__file__).parent / "results" / "soak.json"
RSS_GROWTH_MAX = 64 * MIB
TENANTS = ("soak-a", "soak-b", "soak-c")
HOSTILE = {
    "fork_bomb": "f() { f | f & }; f",
    "output_flood": "cat /dev/zero",
    "memory_hog": "python3 -c 'b = []\nwhile True: b.append(bytearray(1 << 20))'",
}


@dataclass
class Stats:
    """What the clients saw, per operation."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    statuses: dict[str, dict[int, int]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(int))
    )
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    five_xx: list[str] = field(default_factory=list)

    def note(self, op: str, status: int, seconds: float, detail: str = "") -> None:
        self.latencies[op].append(seconds)
        self.statuses[op][status] += 1
        if status >= 500:
            self.five_xx.append(f"{op}: {status} {detail[:200]}")

    def report(self) -> dict[str, Any]:
        out = {}
        for op, values in sorted(self.latencies.items()):
            ordered = sorted(values)
            out[op] = {
                "served": len(values),
                "p50_ms": round(ordered[len(ordered) // 2] * 1000, 1),
                "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 1),
                "statuses": dict(self.statuses[op]),
                "client_errors": self.errors.get(op, 0),
            }
        return out


@dataclass
class Watch:
    """The server process, sampled until stopped."""

    pid: int
    rss_start: int = 0
    rss_peak: int = 0

    def rss(self) -> int:
        status = Path(f"/proc/{self.pid}/status").read_text()
        line = next(x for x in status.splitlines() if x.startswith("VmRSS"))
        return int(line.split()[1]) * 1024

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    async def sample(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.rss_peak = max(self.rss_peak, self.rss())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)


class Soak:
    def __init__(self, server: Server, tenant_keys: dict[str, str], duration_s: float) -> None:
        self.server = server
        self.keys = tenant_keys
        self.deadline = time.monotonic() + duration_s
        self.stats = Stats()
        self.made: set[str] = set()

    def client(self, tenant: str, timeout_s: float = 120.0) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.keys[tenant]}"}
        return httpx.AsyncClient(base_url=self.server.url, headers=headers, timeout=timeout_s)

    async def call(self, op: str, request: Awaitable[httpx.Response]) -> httpx.Response | None:
        started = time.monotonic()
        try:
            response = await request
        except httpx.HTTPError as exc:
            self.stats.errors[op] += 1
            self.stats.note(op, 0, time.monotonic() - started, repr(exc))
            return None
        self.stats.note(op, response.status_code, time.monotonic() - started, response.text)
        return response

    async def create(self, http: httpx.AsyncClient, role: str) -> str | None:
        body = {"metadata": {"role": role}, "timeout_s": 600}
        response = await self.call("create", http.post("/v1/sandboxes", json=body))
        if response is None or response.status_code != 201:
            return None
        sandbox_id = str(response.json()["id"])
        self.made.add(sandbox_id)
        return sandbox_id

    async def kill(self, http: httpx.AsyncClient, sandbox_id: str) -> None:
        await self.call("kill", http.delete(f"/v1/sandboxes/{sandbox_id}"))

    def running(self) -> bool:
        return time.monotonic() < self.deadline

    # -- well-behaved clients --------------------------------------------------------------

    async def worker(self, tenant: str) -> None:
        """One tenant's sandbox: exec, streamed exec, files, PTY and snapshots in turn."""
        async with self.client(tenant) as http:
            sandbox_id = await self.create(http, "worker")
            if sandbox_id is None:
                return
            url = f"/v1/sandboxes/{sandbox_id}"
            turn = 0
            while self.running():
                turn += 1
                await self.call(
                    "exec",
                    http.post(f"{url}/exec", json={"cmd": "echo hi", "timeout_s": 30}),
                )
                stream = {"cmd": "seq 1 20000", "timeout_s": 30, "stream": True}
                await self.call("exec_stream", http.post(f"{url}/exec", json=stream))
                data = os.urandom(256 * 1024)
                path = {"path": f"/tmp/soak-{turn % 4}"}
                await self.call("file_put", http.put(f"{url}/files", params=path, content=data))
                await self.call("file_get", http.get(f"{url}/files", params=path))
                await self.pty(tenant, sandbox_id)
                if turn % 5 == 1:
                    snap = await self.call("snapshot", http.post(f"{url}/snapshots", json={}))
                    if snap is not None and snap.status_code in (200, 201):
                        snap_id = snap.json()["id"]
                        await self.call("snapshot_delete", http.delete(f"/v1/snapshots/{snap_id}"))
            await self.kill(http, sandbox_id)

    async def pty(self, tenant: str, sandbox_id: str) -> None:
        url = self.server.url.replace("http://", "ws://") + f"/v1/sandboxes/{sandbox_id}/pty"
        headers = {"Authorization": f"Bearer {self.keys[tenant]}"}
        started = time.monotonic()
        try:
            async with websockets.connect(url, additional_headers=headers) as ws:
                await ws.send(b"echo pty-ok; exit\n")
                async with asyncio.timeout(30):
                    async for message in ws:
                        if isinstance(message, str) and '"exit"' in message:
                            break
            self.stats.note("pty", 101, time.monotonic() - started)
        except (OSError, TimeoutError, websockets.WebSocketException) as exc:
            self.stats.errors["pty"] += 1
            self.stats.note("pty", 0, time.monotonic() - started, repr(exc))

    async def churn(self, tenant: str) -> None:
        """Create, exec once and kill, over and over."""
        async with self.client(tenant) as http:
            while self.running():
                sandbox_id = await self.create(http, "churn")
                if sandbox_id is None:
                    await asyncio.sleep(1)
                    continue
                body = {"cmd": "uname -r", "timeout_s": 30}
                await self.call("exec", http.post(f"/v1/sandboxes/{sandbox_id}/exec", json=body))
                await self.kill(http, sandbox_id)

    # -- hostile clients and guests --------------------------------------------------------

    async def hostile_guest(self, tenant: str) -> None:
        """A sandbox that attacks itself in turn; a stalled follower of its output."""
        async with self.client(tenant) as http:
            sandbox_id = await self.create(http, "hostile")
            if sandbox_id is None:
                return
            url = f"/v1/sandboxes/{sandbox_id}"
            await self.stalled_follower(http, url)
            while self.running():
                for name, cmd in HOSTILE.items():
                    body = {"cmd": cmd, "timeout_s": 5}
                    await self.call(name, http.post(f"{url}/exec", json=body))
            await self.kill(http, sandbox_id)

    async def stalled_follower(self, http: httpx.AsyncClient, url: str) -> None:
        started = await self.call(
            "spawn", http.post(f"{url}/processes", json={"cmd": "cat /dev/zero"})
        )
        if started is None or started.status_code != 201:
            return
        pid = started.json()["pid"]

        async def follow() -> None:
            request = http.build_request("GET", f"{url}/processes/{pid}/output")
            response = await http.send(request, stream=True)
            self.stats.note("stalled_follow", response.status_code, 0.0)
            with contextlib.suppress(Exception):
                await response.aiter_raw().__anext__()
            await asyncio.sleep(max(0.0, self.deadline - time.monotonic()))  # never reads
            await response.aclose()

        self._tasks.append(asyncio.create_task(follow()))

    async def raw(self, op: str, payload: bytes, hold_s: float, announce: bytes = b"") -> None:
        """A raw HTTP client: sends ``payload`` and holds the connection ``hold_s``."""
        host, port = self.server.url.removeprefix("http://").split(":")
        started = time.monotonic()
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(payload)
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                data = await asyncio.wait_for(reader.read(200), hold_s)
                status = int(data.split()[1]) if data.startswith(b"HTTP/1.1") else 0
                self.stats.note(
                    op, status, time.monotonic() - started, data.decode(errors="replace")
                )
                writer.close()
                return
            self.stats.note(op, 0, time.monotonic() - started)  # held without an answer
            writer.close()
        except OSError as exc:
            self.stats.errors[op] += 1
            self.stats.note(op, 0, time.monotonic() - started, repr(exc))

    async def abusers(self, tenant: str) -> None:
        """Half-sent requests and oversized bodies, over and over."""
        auth = f"Authorization: Bearer {self.keys[tenant]}\r\n".encode()
        while self.running():
            half = b"POST /v1/sandboxes HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 100\r\n"
            big = b"x" * (4 * MIB)
            oversized = (
                b"POST /v1/sandboxes HTTP/1.1\r\nHost: x\r\n"
                + auth
                + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(big)
                + big
            )
            await asyncio.gather(
                self.raw("half_sent_headers", half, 15.0),
                self.raw("half_sent_body", half + b'\r\n{"metadata":', 15.0),
                self.raw("oversized_body", oversized, 15.0),
            )

    async def run(self) -> None:
        self._tasks: list[asyncio.Task[None]] = []
        work = [self.worker(t) for t in TENANTS] + [self.churn(TENANTS[0])]
        work += [self.hostile_guest(TENANTS[1]), self.abusers(TENANTS[2])]
        await asyncio.gather(*work)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def leftovers(server: Server, made: set[str]) -> dict[str, list[str]]:
    """What is left of the run's sandboxes once they are all gone. (The server's spare
    VMMs are not the run's: see :func:`spare_vmms`.)"""
    data_dir = server.settings.data_dir
    vms_dir = data_dir / "vms"
    nft = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=False)
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    ours = {pid: sid for sid in made for pid in pids_mentioning(f"emberbox-{sid}")}
    return {
        "vmm_processes": [
            f"{pid} ({ours[pid]})" for pid in qemu_pids_under(data_dir) if pid in ours
        ],
        "cgroups": [str(p) for sid in made for p in host_cgroups(sid)],
        "nft_rules": [sid for sid in made if sid in nft.stdout or sid[-8:] in nft.stdout],
        "netns": [sid for sid in made if sid in netns.stdout],
        "files": sorted(p.name for p in vms_dir.iterdir() if p.name in made)
        if vms_dir.exists()
        else [],
    }


def spare_vmms(server: Server, made: set[str]) -> list[str]:
    """VMMs under the server's data dir that are none of the run's sandboxes: the idle
    QEMUs the server starts ahead of template restores (emberbox.service.vm.spares),
    which it owns until it stops. At most MAX_SPARES of them may be there."""
    ours = {pid for sid in made for pid in pids_mentioning(f"emberbox-{sid}")}
    return [str(pid) for pid in qemu_pids_under(server.settings.data_dir) if pid not in ours]


def new_key(data_dir: Path, tenant: str) -> str:
    conn = connect(data_dir / "emberbox.db")
    try:
        return keys.create_key(conn, tenant, admin=False, quotas={}).key
    finally:
        conn.close()


async def soak(server: Server, duration_s: float) -> dict[str, Any]:
    watch = Watch(server.process.pid)
    tenant_keys = {t: new_key(server.settings.data_dir, t) for t in TENANTS}
    warm = Soak(server, tenant_keys, 0.0)  # one create/kill first: lazy imports, caches
    async with warm.client(TENANTS[0]) as http:
        sandbox_id = await warm.create(http, "warm-up")
        if sandbox_id is not None:
            await warm.kill(http, sandbox_id)
    await asyncio.sleep(2)
    fds_start, watch.rss_start = watch.fds(), watch.rss()
    watch.rss_peak = watch.rss_start
    stop = asyncio.Event()
    sampler = asyncio.create_task(watch.sample(stop))
    run = Soak(server, tenant_keys, duration_s)
    started = time.monotonic()
    await run.run()
    elapsed = time.monotonic() - started
    await asyncio.sleep(5)  # teardown finishes, connections close
    stop.set()
    await sampler
    rss_end, fds_end = watch.rss(), watch.fds()
    left = leftovers(server, run.made | warm.made)
    spares = spare_vmms(server, run.made | warm.made)
    five_xx = run.stats.five_xx + warm.stats.five_xx
    bars = {
        "zero_5xx": not five_xx,
        "rss_growth_le_64_mib": watch.rss_peak - watch.rss_start <= RSS_GROWTH_MAX,
        "fds_back_to_baseline": fds_end <= fds_start,
        "zero_leftovers": not any(left.values()),
        "spare_vmms_le_max": len(spares) <= MAX_SPARES,
    }
    return {
        "duration_s": round(elapsed, 1),
        "operations": run.stats.report(),
        "five_xx": len(five_xx),
        "five_xx_samples": five_xx[:20],
        "server_rss_mib": {
            "start": round(watch.rss_start / MIB, 1),
            "peak": round(watch.rss_peak / MIB, 1),
            "end": round(rss_end / MIB, 1),
        },
        "server_fds": {"start": fds_start, "end": fds_end},
        "sandboxes_made": len(run.made),
        "leftovers": left,
        "spare_vmms": spares,
        "bars": bars,
        "passed": all(bars.values()),
    }


def write(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--duration-s", type=float, default=120.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    data_dir = short_tmp_dir("eb-soak-")
    env = {"EMBERBOX_POOL_SIZE": "0", "EMBERBOX_API_KEY": secrets.token_urlsafe(24)}
    try:
        with serve_emberbox(data_dir, **env) as server:
            result = asyncio.run(soak(server, args.duration_s))
            write(result, args.out)
    finally:
        subprocess.run(["rm", "-rf", str(data_dir)], check=False)
    failed = [name for name, ok in result["bars"].items() if not ok]
    print(f"soak: {'PASS' if not failed else 'FAIL: ' + ', '.join(failed)} ({args.out})")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
