"""exec `true` round trip: HTTP API vs the agent client directly vs ``subprocess.run``.

The API sandbox lives on ``emberbox serve`` (a separate process, as in production, pool
off so that no refill runs meanwhile); the direct one is the library's ``SandboxVM``
talking to its guest agent in this process. The three are sampled in turn.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from bench.harness import TRUE, ms_since, progress, server_process
from bench.stats import Measurement, Report
from emberbox.config import Settings
from emberbox.sdk import AsyncSandbox
from emberbox.service.vm.machine import SandboxVM

API = "exec `true`: HTTP API (SDK, keep-alive)"
DIRECT = "exec `true`: direct agent client"
HOST = "exec `true`: subprocess.run on the host"
WARMUP = 3


async def exec_round_trip(data_dir: Path, runs: int, report: Report) -> None:
    api, direct, host = Measurement(API), Measurement(DIRECT), Measurement(HOST)
    settings = Settings(data_dir=data_dir / "lib")
    with server_process(data_dir / "api", EMBERBOX_POOL_SIZE="0") as url:
        progress("exec round trip: starting a sandbox on the server and one in-process")
        remote = await AsyncSandbox.create(url=url)
        local: SandboxVM | None = None
        try:
            local = await SandboxVM.start(settings)
            for _ in range(WARMUP):
                await remote.commands.run(["true"])
                await local.agent.exec(TRUE)
            for _ in range(runs):
                started = time.perf_counter()
                await remote.commands.run(["true"])
                api.samples.append(ms_since(started))
                started = time.perf_counter()
                await local.agent.exec(TRUE)
                direct.samples.append(ms_since(started))
                started = time.perf_counter()
                subprocess.run(["true"], check=True)  # noqa: ASYNC221 (the baseline blocks)
                host.samples.append(ms_since(started))
        finally:
            if local is not None:
                await local.kill()
            await remote.kill()
            await remote.close()
    for m in (api, direct, host):
        report.add(m)
