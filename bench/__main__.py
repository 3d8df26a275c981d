"""`make bench`: measure emberbox side by side on this machine and print a table.

Writes bench/results/latest.json (p50/p90 in ms and sample count per measurement, and
the ratios as top-level numbers). Numbers, not asserts: these machines are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from bench.stats import Measurement, Report
from emberbox.config import Settings
from emberbox.sdk import AsyncSandbox
from emberbox.service.sandbox import Sandbox

RESULTS = Path(__file__).parent / "results" / "latest.json"


async def cold_boot(settings: Settings, runs: int, report: Report) -> None:
    boot = Measurement("cold boot -> agent handshake")
    first = Measurement("cold boot -> first exec result")
    for _ in range(runs):
        started = time.perf_counter()
        sb = await Sandbox.start(settings)
        boot.samples_ms.append((time.perf_counter() - started) * 1000)
        await sb.exec(["true"])
        first.samples_ms.append((time.perf_counter() - started) * 1000)
        await sb.kill()
    report.add(boot)
    report.add(first)


async def exec_round_trip(settings: Settings, runs: int, report: Report) -> None:
    direct = Measurement("exec `true`: direct agent client")
    host = Measurement("exec `true`: subprocess.run on the host")
    sb = await Sandbox.start(settings)
    try:
        for _ in range(3):
            await sb.exec(["true"])
        for _ in range(runs):
            started = time.perf_counter()
            await sb.exec(["true"])
            direct.samples_ms.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            subprocess.run(["true"], check=True)  # noqa: ASYNC221 (the baseline is a blocking call)
            host.samples_ms.append((time.perf_counter() - started) * 1000)
    finally:
        await sb.kill()
    report.add(direct)
    report.add(host)


@contextlib.contextmanager
def running_server(data_dir: Path) -> Iterator[str]:
    """`emberbox serve` on a free port, stopped (and its sandboxes killed) afterwards."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    env = {**os.environ, "EMBERBOX_DATA_DIR": str(data_dir), "EMBERBOX_PORT": str(port)}
    emberbox = Path(sys.executable).parent / "emberbox"
    server = subprocess.Popen([str(emberbox), "serve"], env=env, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        server.wait(30)


async def api_round_trip(settings: Settings, runs: int, report: Report) -> None:
    """exec `true` through the HTTP API vs the agent client, interleaved in one run."""
    api = Measurement("exec `true`: HTTP API (SDK, keep-alive)")
    direct = Measurement("exec `true`: agent client, same run")
    with running_server(settings.data_dir / "api") as url:
        remote = await AsyncSandbox.create(url=url)
        local = await Sandbox.start(settings)
        try:
            for _ in range(3):
                await remote.commands.run(["true"])
            for _ in range(runs):
                started = time.perf_counter()
                await remote.commands.run(["true"])
                api.samples_ms.append((time.perf_counter() - started) * 1000)
                started = time.perf_counter()
                await local.exec(["true"])
                direct.samples_ms.append((time.perf_counter() - started) * 1000)
        finally:
            await local.kill()
            await remote.kill()
            await remote.close()
    report.add(api)
    report.add(direct)
    report.ratio("api_exec_vs_agent_client", api.name, direct.name)


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="eb-bench-", dir="/tmp") as data_dir:
        settings = Settings(data_dir=Path(data_dir))
        report = Report()
        await cold_boot(settings, args.boots, report)
        await exec_round_trip(settings, args.execs, report)
        await api_round_trip(settings, args.execs, report)
        report.ratio("direct_exec_vs_host_subprocess", "exec `true`: direct agent client",
                     "exec `true`: subprocess.run on the host")  # fmt: skip
    print(report.table())
    report.write(args.out)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--boots", type=int, default=10)
    parser.add_argument("--execs", type=int, default=50)
    parser.add_argument("--out", type=Path, default=RESULTS)
    asyncio.run(main(parser.parse_args()))
