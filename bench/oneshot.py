"""One-shot ``python3 -c 'print(1)'``: emberbox through its API, from nothing to the
result, vs gVisor's ``runsc do`` (Debian's package) as an outside baseline.

emberbox runs with the service's defaults (templates on, a pool of one), so a create is
a pool hand-out; the pool is refilled before every sample of either. The API is served
from this process (real HTTP on a free port) so that the bench can see the pool.
``runsc do`` runs the host's ``/usr/bin/python3`` under ptrace with the host's root
read-only; as root it needs no other flag on this cgroup-v1 host, as non-root it needs
``--rootless``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path

from bench.harness import Skip, Variant, ms_since, progress, server_in_process, wait_pool_full
from bench.stats import Measurement, Report
from emberbox.sdk import AsyncSandbox

CODE = ["python3", "-c", "print(1)"]
EMBERBOX = "one-shot print(1): emberbox API (to result)"
EMBERBOX_KILLED = "one-shot print(1): emberbox API (incl. kill)"
RUNSC = "one-shot print(1): runsc do (ptrace, no network)"
WARM = "print(1) in a running sandbox (API exec)"
RUNSC_TIMEOUT_S = 120.0
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, the same python3 as in the guest image


def host_python() -> str:
    """The host's own interpreter, by absolute path: ``python3`` on PATH may be a shim
    (pyenv's is a shell script that forks a dozen times: +1 s under ptrace)."""
    if Path(SYSTEM_PYTHON).exists():
        return SYSTEM_PYTHON
    found = shutil.which("python3")
    if found is None:
        raise Skip("no python3 on the host for runsc to run")
    return str(Path(found).resolve())


def runsc_argv() -> list[str]:
    """The baseline's command line; raises Skip when runsc is not installed."""
    binary = shutil.which("runsc")
    if binary is None:
        raise Skip("runsc not installed (Debian: apt-get install --no-install-recommends runsc)")
    rootless = [] if os.geteuid() == 0 else ["--rootless"]
    code = [host_python(), *CODE[1:]]
    return [binary, *rootless, "--platform=ptrace", "--network=none", "do", *code]


async def run_runsc(argv: list[str]) -> float:
    """Milliseconds for one ``runsc do``; raises Skip with runsc's own words on failure."""
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), RUNSC_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise Skip(f"runsc did not finish within {RUNSC_TIMEOUT_S:g} s") from None
    elapsed = ms_since(started)
    if proc.returncode != 0 or out != b"1\n":
        lines = err.decode(errors="replace").strip().splitlines() or [f"stdout {out!r}"]
        raise Skip(f"runsc exited {proc.returncode}: {lines[-1][:160]}")
    return elapsed


async def run_emberbox(url: str, to_result: Measurement, killed: Measurement) -> None:
    started = time.perf_counter()
    sb = await AsyncSandbox.create(url=url)
    try:
        result = await sb.commands.run(CODE)
        to_result.samples.append(ms_since(started))
        if result.stdout != "1\n":
            raise RuntimeError(f"print(1) in sandbox {sb.id} gave {result!r}")
    finally:
        await sb.kill()
        await sb.close()
    killed.samples.append(ms_since(started))


async def probe_runsc(report: Report) -> list[str] | None:
    """runsc's command line if it runs here (the probe doubles as a warm-up), else None
    and a skipped row saying why."""
    try:
        argv = runsc_argv()
        await run_runsc(argv)
    except Skip as exc:
        report.skip(RUNSC, str(exc))
        return None
    report.notes["runsc command"] = " ".join(argv)
    return argv


async def one_shot(pool: Variant, runs: int, report: Report) -> None:
    argv = await probe_runsc(report)
    if pool.manager is None:
        report.skip(EMBERBOX, pool.unavailable or "unavailable")
    async with contextlib.AsyncExitStack() as stack:
        url = None
        if pool.manager is not None:
            url = await stack.enter_async_context(server_in_process(pool.settings, pool.manager))
        await _interleaved(pool, url, argv, runs if url or argv else 0, report)


async def _interleaved(
    pool: Variant, url: str | None, argv: list[str] | None, runs: int, report: Report
) -> None:
    """``runs`` rounds of: one-shot through the API, ``runsc do``, and print(1) in an
    already running sandbox (how much of the one-shot is python3 starting in the guest)."""
    ours, killed = Measurement(EMBERBOX), Measurement(EMBERBOX_KILLED)
    runsc, warm = Measurement(RUNSC), Measurement(WARM)
    running = await AsyncSandbox.create(url=url) if url and runs else None
    try:
        if running is not None:
            await running.commands.run(CODE)
        for i in range(runs):
            progress(f"one-shot: round {i + 1}/{runs}")
            if url is not None and running is not None:
                await wait_pool_full(pool)
                await run_emberbox(url, ours, killed)
                await wait_pool_full(pool)
                started = time.perf_counter()
                await running.commands.run(CODE)
                warm.samples.append(ms_since(started))
            if argv is not None:
                await wait_pool_full(pool)
                try:
                    runsc.samples.append(await run_runsc(argv))
                except Skip as exc:
                    report.skip(RUNSC, f"failed in round {i + 1}: {exc}")
                    argv = None
    finally:
        if running is not None:
            await running.kill()
            await running.close()
        for m in (ours, killed, warm, runsc):
            report.add(m)
