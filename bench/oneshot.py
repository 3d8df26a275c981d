"""One-shot runs: a program from nothing to its result through emberbox's API, vs the
same program under gVisor's ``runsc do`` (Debian's package) and on the host.

Per language (python3, node, bash, c), ``POST /v1/run`` prints 1: emberbox creates a
sandbox of the run image (``Settings.run_image``, "polyglot"), runs the program and
answers; the sandbox is killed after the answer, in the background. The bench serves
the API from this process with its own manager whose warm pool holds the run image
(``default_image=run_image``, ``pool_size=1``: a create is a pool hand-out), and waits
before each sample until the pool is full again and the last run's sandbox is gone.
python3 runs forked from the warm interpreter in the template (docs/oneshot.md).

``runsc do`` runs the host's own programs under ptrace with the host's root seen through
an overlay; as root it needs no other flag, as non-root it needs ``--rootless``. c is
compiled and run in each tool (gcc -O2 then ./main), as ``/v1/run`` does.

Also measured, on the bench's "warm pool" variant (the default image): the sandbox API
path (``AsyncSandbox.create()`` + ``commands.run(python3 -c print(1))``, to the result
and with the kill) and print(1) in an already running sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread
import httpx

from bench.harness import Skip, Variant, ms_since, progress, server_in_process, wait_pool_full
from bench.stats import Measurement, Report
from emberbox.config import Settings
from emberbox.images.build import ImageBuilder
from emberbox.sdk import AsyncSandbox
from emberbox.service.sandboxes.manager import SandboxManager

CODE = ["python3", "-c", "print(1)"]
# The headline row (oneshot_emberbox_over_runsc): python3 print(1) through POST /v1/run.
EMBERBOX = "one-shot print(1): emberbox API (to result)"
RUNSC = "one-shot print(1): runsc do (ptrace, no network)"
HOST = "one-shot print(1): host (no sandbox)"
SANDBOX = "one-shot print(1): sandbox API create + exec (to result)"
SANDBOX_KILLED = "one-shot print(1): sandbox API create + exec (incl. kill)"
EMBERBOX_KILLED = SANDBOX_KILLED  # the name earlier versions used
WARM = "print(1) in a running sandbox (API exec)"
RUNSC_TIMEOUT_S = 120.0
RUN_TIMEOUT_S = 300.0  # one /v1/run (the first may build the run image's template)
PROGRAM_TIMEOUT_S = 60.0  # the program's own (node takes seconds under TCG on a busy host)
IDLE_TIMEOUT_S = 60.0  # until the last run's sandbox is killed
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, the same python3 as in the guest image
MAX_OTHER_RUNS = 10  # node, bash and c: each sample of node costs seconds under TCG


@dataclass(frozen=True)
class Program:
    """One language's program printing 1, and the same program as a host command."""

    language: str
    code: str
    host: tuple[str, ...]  # argv; "{dir}" is a scratch directory with the source in it

    def rows(self) -> tuple[str, str, str]:
        """Its emberbox, runsc and host row names."""
        if self.language == "python3":
            return EMBERBOX, RUNSC, HOST
        prefix = f"one-shot {self.language} print 1"
        return (
            f"{prefix}: emberbox API (to result)",
            f"{prefix}: runsc do (ptrace, no network)",
            f"{prefix}: host (no sandbox)",
        )

    @property
    def key(self) -> str:
        return self.language.replace("+", "p")


C_SOURCE = '#include <stdio.h>\nint main(void) { puts("1"); return 0; }\n'
PROGRAMS = (
    Program("python3", "print(1)\n", (SYSTEM_PYTHON, "-c", "print(1)")),
    Program("node", "console.log(1)\n", ("node", "-e", "console.log(1)")),
    Program("bash", "echo 1\n", ("bash", "-c", "echo 1")),
    Program(
        "c",
        C_SOURCE,
        ("/bin/sh", "-c", "cd {dir} && gcc -O2 -std=gnu17 -o main main.c -lm && ./main"),
    ),
)


def host_python() -> str:
    """The host's own interpreter, by absolute path: ``python3`` on PATH may be a shim
    (pyenv's is a shell script that forks a dozen times: +1 s under ptrace)."""
    if Path(SYSTEM_PYTHON).exists():
        return SYSTEM_PYTHON
    found = shutil.which("python3")
    if found is None:
        raise Skip("no python3 on the host for runsc to run")
    return str(Path(found).resolve())


def runsc_prefix() -> list[str]:
    """``runsc ... do``; raises Skip when runsc is not installed."""
    binary = shutil.which("runsc")
    if binary is None:
        raise Skip("runsc not installed (Debian: apt-get install --no-install-recommends runsc)")
    rootless = [] if os.geteuid() == 0 else ["--rootless"]
    return [binary, *rootless, "--platform=ptrace", "--network=none", "do"]


def runsc_argv() -> list[str]:
    """The python3 baseline's command line; raises Skip when runsc is not installed."""
    return [*runsc_prefix(), host_python(), *CODE[1:]]


def host_argv(program: Program, scratch: Path) -> list[str]:
    """The program as a host command, its source written into ``scratch``."""
    if program.language == "python3":
        return [host_python(), *CODE[1:]]
    if program.language == "c":
        (scratch / "main.c").write_text(program.code)
    binary = shutil.which(program.host[0])
    if binary is None:
        raise Skip(f"no {program.host[0]} on the host")
    return [binary, *(arg.replace("{dir}", str(scratch)) for arg in program.host[1:])]


async def run_command(argv: list[str], what: str = "runsc") -> float:
    """Milliseconds for one command that must print 1; raises Skip with its own words
    on failure."""
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), RUNSC_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise Skip(f"{what} did not finish within {RUNSC_TIMEOUT_S:g} s") from None
    elapsed = ms_since(started)
    if proc.returncode != 0 or out != b"1\n":
        lines = err.decode(errors="replace").strip().splitlines() or [f"stdout {out!r}"]
        raise Skip(f"{what} exited {proc.returncode}: {lines[-1][:160]}")
    return elapsed


async def run_runsc(argv: list[str]) -> float:
    """Milliseconds for one ``runsc do``; raises Skip with runsc's own words on failure."""
    return await run_command(argv)


async def run_sandbox_api(url: str, to_result: Measurement, killed: Measurement) -> None:
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
    """The per-language ``/v1/run`` rows against runsc and the host, then the sandbox
    API rows on ``pool`` (the bench's warm-pool variant of the default image)."""
    argv = await probe_runsc(report)
    async with contextlib.AsyncExitStack() as stack:
        runner = await _run_pool(stack, pool, report) if runs else None
        url = None
        if runner is not None and runner.manager is not None:
            url = await stack.enter_async_context(
                server_in_process(runner.settings, runner.manager)
            )
        await _per_language(runner, url, argv is not None, runs, report)
    if pool.manager is None:
        report.skip(SANDBOX, pool.unavailable or "unavailable")
    async with contextlib.AsyncExitStack() as stack:
        url = None
        if pool.manager is not None:
            url = await stack.enter_async_context(server_in_process(pool.settings, pool.manager))
        await _interleaved(pool, url, runs if url else 0, report)


async def _run_pool(
    stack: contextlib.AsyncExitStack, pool: Variant, report: Report
) -> Variant | None:
    """A manager whose warm pool holds the run image (its data beside ``pool``'s)."""
    base = Settings()
    settings = Settings(
        data_dir=pool.settings.data_dir.parent / "oneshot",
        templates=True,
        pool_size=1,
        default_image=base.run_image,
    )
    try:
        await anyio.to_thread.run_sync(ImageBuilder(base).build, base.run_image)
        manager = await stack.enter_async_context(SandboxManager(settings))
    except Exception as exc:  # the rows say why; the other sections go on
        report.skip(EMBERBOX, f"no run image / manager: {type(exc).__name__}: {exc}"[:200])
        return None
    report.notes["one-shot config"] = (
        f"POST /v1/run, run_image={settings.run_image}, pool of 1 of it "
        f"(default_image={settings.default_image}, {settings.default_vcpus} vCPU, "
        f"{settings.default_memory_mib} MiB), templates on"
    )
    return Variant("run pool", settings, manager)


async def _per_language(
    runner: Variant | None, url: str | None, runsc: bool, runs: int, report: Report
) -> None:
    with tempfile.TemporaryDirectory(prefix="eb-oneshot-") as scratch:
        for program in PROGRAMS:
            count = runs if program.language == "python3" else min(runs, MAX_OTHER_RUNS)
            await _language(program, runner, url, runsc, count, Path(scratch), report)


async def _language(
    program: Program,
    runner: Variant | None,
    url: str | None,
    runsc: bool,
    runs: int,
    scratch: Path,
    report: Report,
) -> None:
    """``runs`` rounds of: the program through /v1/run, under runsc, on the host."""
    names = program.rows()
    ours, gvisor, host = (Measurement(name) for name in names)
    try:
        host_cmd = host_argv(program, scratch)
    except Skip as exc:
        report.skip(names[2], str(exc))
        host_cmd = None
    runsc_cmd = None if not runsc or host_cmd is None else [*runsc_prefix(), *host_cmd]
    async with httpx.AsyncClient(base_url=url or "http://unused", timeout=RUN_TIMEOUT_S) as http:
        if url is not None:  # a warm-up: the first run of a language may build the template
            try:
                await _run_once(http, program, runner)
            except Skip as exc:
                report.skip(ours.name, f"warm-up failed: {exc}")
                url = None
        for i in range(runs):
            progress(f"one-shot {program.language}: round {i + 1}/{runs}")
            if url is not None:
                try:
                    ours.samples.append(await _run_once(http, program, runner))
                except Skip as exc:
                    report.skip(ours.name, f"failed in round {i + 1}: {exc}")
                    url = None
            for cmd, m, what in ((runsc_cmd, gvisor, "runsc"), (host_cmd, host, "host")):
                if cmd is None:
                    continue
                try:
                    m.samples.append(await run_command(cmd, what))
                except Skip as exc:
                    report.skip(m.name, f"failed in round {i + 1}: {exc}")
                    if what == "runsc":
                        runsc_cmd = None
                    else:
                        host_cmd = None
    for m in (ours, gvisor, host):
        report.add(m)
    report.ratio(f"oneshot_{program.key}_emberbox_over_runsc", names[0], names[1])
    report.ratio(f"oneshot_{program.key}_emberbox_over_host", names[0], names[2])


async def _run_once(http: httpx.AsyncClient, program: Program, runner: Variant | None) -> float:
    """Milliseconds of one POST /v1/run, once the pool is full and nothing else runs."""
    await wait_pool_full(runner)
    await _wait_idle(http)
    started = time.perf_counter()
    body = {"language": program.language, "code": program.code, "timeout_s": PROGRAM_TIMEOUT_S}
    response = await http.post("/v1/run", json=body)
    elapsed = ms_since(started)
    answer = response.json()
    if response.status_code != 200 or answer.get("stdout") != "1\n":
        raise Skip(f"/v1/run of {program.language} gave {response.status_code} {answer}"[:300])
    return elapsed


async def _wait_idle(http: httpx.AsyncClient) -> None:
    """Until the last run's sandbox (killed in the background) is gone."""
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while time.monotonic() < deadline:
        sandboxes = (await http.get("/v1/sandboxes")).json()["sandboxes"]
        if all(s["state"] in ("stopped", "error") for s in sandboxes):
            return
        await anyio.sleep(0.05)


async def _interleaved(pool: Variant, url: str | None, runs: int, report: Report) -> None:
    """``runs`` rounds of: the sandbox API one-shot, and print(1) in an already running
    sandbox (how much of the one-shot is python3 starting in the guest)."""
    ours, killed = Measurement(SANDBOX), Measurement(SANDBOX_KILLED)
    warm = Measurement(WARM)
    running = await AsyncSandbox.create(url=url) if url and runs else None
    try:
        if running is not None:
            await running.commands.run(CODE)
        for i in range(runs):
            progress(f"one-shot (sandbox API): round {i + 1}/{runs}")
            if url is not None and running is not None:
                await wait_pool_full(pool)
                await run_sandbox_api(url, ours, killed)
                await wait_pool_full(pool)
                started = time.perf_counter()
                await running.commands.run(CODE)
                warm.samples.append(ms_since(started))
    finally:
        if running is not None:
            await running.kill()
            await running.close()
        for m in (ours, killed, warm):
            report.add(m)
