"""The E2B front (docs/e2b.md) against emberbox's own SDK, on one ``emberbox serve``
(pool off, so both creates restore the same template):

- ``Sandbox.create()`` -> first ``commands.run('true')``: the E2B SDK vs emberbox's SDK
  (goal: at most 1.2x);
- ``commands.run('true')``: through envd vs native exec (goal: at most 1.3x);
- ``run_code('1+1')`` in a warm context (e2b-code-interpreter).

The E2B SDKs are blocking: the section runs in a worker thread.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import anyio.to_thread

from bench.harness import ms_since, progress, server_process
from bench.stats import Measurement, Report

E2B_CREATE = "E2B SDK: create -> first run('true')"
NATIVE_CREATE = "emberbox SDK: create -> first exec('true')"
E2B_RUN = "E2B SDK: commands.run('true')"
NATIVE_RUN = "emberbox SDK: exec('true')"
# The same as root: no user switch, only bash's own start and its (fork-free) profile.
E2B_RUN_ROOT = "E2B SDK: commands.run('true', user='root')"
# What the E2B SDK actually asks for: `/bin/bash -l -c true`, as user, with the
# environment and directory the front gives it. The native API has no user field, so
# natively the switch is a `setpriv` exec (the E2B front has the agent switch itself).
NATIVE_LOGIN = "emberbox SDK: exec('bash -l -c true')"
LOGIN_ENV = {"HOME": "/home/user", "USER": "user", "LOGNAME": "user"}
# The same login shell natively as root: the E2B command's cost without any switch.
NATIVE_LOGIN_ROOT = "emberbox SDK: exec('bash -l -c true'), root"
ROOT_ENV = {"HOME": "/root", "USER": "root", "LOGNAME": "root"}
RUN_CODE = "E2B code interpreter: run_code('1+1'), warm"
WARMUP = 2
# Before each timed create: both shapes share one spare VMM (refilled 0.3 s after a
# restore), so a create right behind the other side's would find none and start QEMU
# itself. Waiting puts both sides in the same state (bench/create.py waits likewise).
SETTLE_S = 1.0
LOGIN_SHELL = ["setpriv", "--reuid=1000", "--regid=1000", "--init-groups", "--"]
LOGIN_SHELL += ["bash", "-l", "-c", "true"]


async def e2b_front(data_dir: Path, samples: int, runs: int, report: Report) -> None:
    with server_process(data_dir / "e2b", EMBERBOX_POOL_SIZE="0") as url:
        measured = await anyio.to_thread.run_sync(_measure, url, samples, runs)
    for m in measured:
        report.add(m)
    report.ratio("e2b_create_over_native", E2B_CREATE, NATIVE_CREATE)
    report.ratio("e2b_run_over_native_exec", E2B_RUN, NATIVE_RUN)
    report.ratio("e2b_run_over_native_login_shell", E2B_RUN, NATIVE_LOGIN)
    report.ratio("e2b_root_run_over_native_exec", E2B_RUN_ROOT, NATIVE_RUN)
    # the front alone: the same login shell, no user switch on either side
    report.ratio("e2b_root_run_over_native_root_login_shell", E2B_RUN_ROOT, NATIVE_LOGIN_ROOT)
    # what running as `user` costs over root (the agent's own switch)
    report.ratio("e2b_run_over_native_root_login_shell", E2B_RUN, NATIVE_LOGIN_ROOT)
    report.check("e2b_create_over_native", 1.2)
    report.check("e2b_run_over_native_exec", 1.3)


def _measure(url: str, samples: int, runs: int) -> list[Measurement]:
    os.environ.update(
        E2B_API_URL=f"{url}/e2b", E2B_SANDBOX_URL=f"{url}/e2b/envd", E2B_API_KEY="e2b_local"
    )
    from e2b_code_interpreter import Sandbox as E2bSandbox

    from emberbox.sdk import Sandbox

    names = (E2B_CREATE, NATIVE_CREATE, E2B_RUN, NATIVE_RUN, NATIVE_LOGIN, RUN_CODE, E2B_RUN_ROOT)
    out = [Measurement(n) for n in (*names, NATIVE_LOGIN_ROOT)]
    e2b_create, native_create, e2b_run, native_run, native_login, run_code, e2b_root = out[:7]
    native_login_root = out[7]
    progress(f"e2b front: {samples} creates each way")
    for _ in range(samples):
        time.sleep(SETTLE_S)
        started = time.perf_counter()
        box = E2bSandbox.create()
        box.commands.run("true")
        e2b_create.samples.append(ms_since(started))
        box.kill()
        time.sleep(SETTLE_S)
        started = time.perf_counter()
        native = Sandbox.create(url=url)
        native.commands.run(["true"])
        native_create.samples.append(ms_since(started))
        native.kill()
    progress(f"e2b front: {runs} runs each way")
    box, native = E2bSandbox.create(), Sandbox.create(url=url)
    try:
        for _ in range(WARMUP):
            box.commands.run("true")
            native.commands.run(["true"])
            box.run_code("1+1")
        for _ in range(runs):
            started = time.perf_counter()
            box.commands.run("true")
            e2b_run.samples.append(ms_since(started))
            started = time.perf_counter()
            native.commands.run(["true"])
            native_run.samples.append(ms_since(started))
            started = time.perf_counter()
            native.commands.run(LOGIN_SHELL, env=LOGIN_ENV, cwd="/home/user")
            native_login.samples.append(ms_since(started))
            started = time.perf_counter()
            native.commands.run(LOGIN_SHELL[5:], env=ROOT_ENV, cwd="/root")
            native_login_root.samples.append(ms_since(started))
            started = time.perf_counter()
            box.commands.run("true", user="root")
            e2b_root.samples.append(ms_since(started))
            started = time.perf_counter()
            box.run_code("1+1")
            run_code.samples.append(ms_since(started))
    finally:
        box.kill()
        native.kill()
    return out
