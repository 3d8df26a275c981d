"""A server in the sandbox (``python3 -m http.server``): reached through the API's port
proxy (the agent's channel) vs over the sandbox's own network (its address, from the
host), and the files API over the same channel as a baseline.

One sandbox with ``egress full`` (so that it has an address) serves both ways. The
host reaching the guest's address is not something emberbox promises (its rules are
about egress): when it cannot, that side is skipped with the reason.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx

from bench.harness import ms_since, progress, server_process
from bench.stats import Measurement, Report
from emberbox.sdk import AsyncSandbox

BIG_MIB = 20
PORT = 8000
RTT_PROXY = "HTTP GET round trip: /ports proxy"
RTT_NET = "HTTP GET round trip: sandbox network"
BULK_PROXY = f"{BIG_MIB} MiB GET: /ports proxy"
BULK_NET = f"{BIG_MIB} MiB GET: sandbox network"
BULK_FILES = f"{BIG_MIB} MiB read: files API (same channel)"
WARMUP = 3


async def ports_proxy(data_dir: Path, runs: int, report: Report) -> None:
    measures = {n: Measurement(n) for n in (RTT_PROXY, RTT_NET, BULK_PROXY, BULK_NET, BULK_FILES)}
    with server_process(data_dir / "ports", EMBERBOX_POOL_SIZE="0") as url:
        progress("ports: a sandbox serving a 20 MiB file over http.server")
        sb = await AsyncSandbox.create(url=url, network={"egress": "full"})
        try:
            await sb.commands.run(f"mkdir -p /srv && head -c {BIG_MIB << 20} /dev/zero > /srv/big")
            await sb.commands.run(f"python3 -m http.server {PORT} -d /srv", background=True)
            proxy = await sb.ports.url(PORT)
            address = (await sb.info()).ip_address
            direct = f"http://{address}:{PORT}/" if address else None
            async with httpx.AsyncClient(timeout=120) as client:
                await _wait_up(client, proxy)
                if direct is not None and not await _reachable(client, direct):
                    report.skip(RTT_NET, f"the host cannot reach {address}:{PORT}")
                    direct = None
                for _ in range(WARMUP):
                    await client.get(proxy)
                for _ in range(runs):
                    await _sample(client, proxy, measures[RTT_PROXY], measures[BULK_PROXY])
                    if direct is not None:
                        await _sample(client, direct, measures[RTT_NET], measures[BULK_NET])
                    started = time.perf_counter()
                    await sb.files.read("/srv/big")
                    measures[BULK_FILES].samples.append(ms_since(started))
        finally:
            await sb.kill()
            await sb.close()
    for m in measures.values():
        report.add(m)
    for name in (BULK_PROXY, BULK_NET, BULK_FILES):
        if name in report.measurements:
            seconds = report.measurements[name].quantile(0.5) / 1000
            report.number(f"MiB/s {name}", BIG_MIB / seconds)
    report.ratio("ports_proxy_rtt_over_network", RTT_PROXY, RTT_NET)


async def _sample(
    client: httpx.AsyncClient, base: str, rtt: Measurement, bulk: Measurement
) -> None:
    started = time.perf_counter()
    (await client.get(base)).raise_for_status()
    rtt.samples.append(ms_since(started))
    started = time.perf_counter()
    async with client.stream("GET", base + "big") as response:
        async for _ in response.aiter_bytes():
            pass
    bulk.samples.append(ms_since(started))


async def _wait_up(client: httpx.AsyncClient, url: str) -> None:
    deadline = time.monotonic() + 60
    while (await client.get(url)).status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError("the guest's http.server did not come up")
        await asyncio.sleep(0.5)


async def _reachable(client: httpx.AsyncClient, url: str) -> bool:
    try:
        return (await client.get(url, timeout=3)).status_code == 200
    except httpx.TransportError:
        return False
