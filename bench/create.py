"""create -> first exec result: cold boot vs snapshot restore vs warm pool, interleaved.

Each variant has its own manager and data dir (all three open side by side); a round
takes one sample of each, in an order that rotates from round to round, so that drift
and noise hit all three alike. Before every sample the pool is refilled, so no restore
runs in the background of a timed cold boot. The same rounds time ``exec true`` on a
long-running sandbox through the manager: the yardstick for the warm pool.
"""

from __future__ import annotations

import time

from bench.harness import TRUE, Variant, ms_since, progress, wait_pool_full, wait_spares
from bench.stats import Measurement, Report
from emberbox.service.sandboxes.manager import SandboxManager

EXEC_RTT = "exec `true`: running sandbox (manager)"
EXECS_PER_ROUND = 3


def first_exec_name(variant: str) -> str:
    return f"create -> first exec: {variant}"


def running_name(variant: str) -> str:
    return f"create -> running: {variant}"


async def sample_create(manager: SandboxManager, running: Measurement, first: Measurement) -> None:
    """One create -> exec `true` -> (untimed) kill."""
    started = time.perf_counter()
    record = await manager.create()
    try:
        running.samples.append(ms_since(started))
        result = await manager.exec(record.id, TRUE)
        first.samples.append(ms_since(started))
        if result.exit_code != 0:
            raise RuntimeError(f"`true` exited {result.exit_code} in sandbox {record.id}")
    finally:
        await manager.kill(record.id)


async def create_to_first_exec(variants: list[Variant], rounds: int, report: Report) -> None:
    ready = [v for v in variants if v.manager is not None]
    for v in variants:
        if v.manager is None:
            report.skip(first_exec_name(v.name), v.unavailable or "unavailable")
    if not ready:
        return
    pool = next((v for v in ready if v.settings.pool_size > 0), None)
    running = {v.name: Measurement(running_name(v.name)) for v in ready}
    first = {v.name: Measurement(first_exec_name(v.name)) for v in ready}
    rtt = Measurement(EXEC_RTT)
    host = ready[0].get()
    long_lived = await host.create()
    try:
        for i in range(rounds):
            progress(f"create -> first exec: round {i + 1}/{rounds}")
            order = ready[i % len(ready) :] + ready[: i % len(ready)]
            for v in order:
                await wait_pool_full(pool)
                await wait_spares(ready)
                await sample_create(v.get(), running[v.name], first[v.name])
            await wait_pool_full(pool)
            await wait_spares(ready)
            for _ in range(EXECS_PER_ROUND):
                started = time.perf_counter()
                await host.exec(long_lived.id, TRUE)
                rtt.samples.append(ms_since(started))
    finally:
        await host.kill(long_lived.id)
        for v in ready:
            report.add(running[v.name])
            report.add(first[v.name])
        report.add(rtt)
