"""`make bench`: measure emberbox side by side on this machine and print a table.

Writes bench/results/latest.json (p50/p90 in ms and sample count per measurement, and
the ratios as top-level numbers). Numbers, not asserts: these machines are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import tempfile
import time
from pathlib import Path

from bench.stats import Measurement, Report
from emberbox.config import Settings
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


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="eb-bench-", dir="/tmp") as data_dir:
        settings = Settings(data_dir=Path(data_dir))
        report = Report()
        await cold_boot(settings, args.boots, report)
        await exec_round_trip(settings, args.execs, report)
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
