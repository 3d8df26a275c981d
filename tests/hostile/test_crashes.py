"""Crashes around a sandbox: its VMM SIGKILLed mid-exec, the server SIGKILLed mid-exec
and restarted. Each ends with a clear error or a reconciled state, and nothing left over
(no VMM process, work dir or host cgroup) but what still runs on purpose."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from emberbox.vmm import cgroups
from tests.support.hostile import (
    ACK_PATH,
    Bystander,
    HostileCase,
    HostileServer,
    assert_cleaned_up,
    host_cgroups,
    hostile_server,
    put_acknowledged,
    wait_for_state,
)
from tests.support.paths import qemu_pids_under, short_tmp_dir
from tests.support.servers import serve_emberbox

pytestmark = [pytest.mark.vm]

ANSWER_BOUND_S = 10.0


def _exec_in_background(
    server: HostileServer, sandbox_id: str, cmd: str
) -> tuple[threading.Thread, list[httpx.Response | Exception]]:
    """POST an exec from a thread; its answer (or transport error) lands in the list."""
    answers: list[httpx.Response | Exception] = []

    def run() -> None:
        with server.client(timeout_s=60) as client:
            try:
                body = {"cmd": cmd, "timeout_s": 30}
                answers.append(client.post(f"/v1/sandboxes/{sandbox_id}/exec", json=body))
            except httpx.TransportError as exc:
                answers.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, answers


def _vmm_pid(server: HostileServer, sandbox_id: str) -> int:
    pids = qemu_pids_under(server.data_dir / "vms" / sandbox_id)
    assert len(pids) == 1, pids
    return pids[0]


def test_sigkill_of_the_vmm_mid_exec(
    server: HostileServer, bystander: Bystander, hostile_case: HostileCase
) -> None:
    """The exec in flight gets a clear 502 at once, the sandbox ends `error` with the
    reason, and its VMM process, work dir and host cgroup are gone."""
    with server.client() as client:
        sandbox_id = server.create(client, metadata={"role": "vmm-kill"})
        assert host_cgroups(sandbox_id) or cgroups.version() is None  # else nothing to check
        with hostile_case("SIGKILL of the VMM mid-exec", "reaper: error + teardown") as case:
            thread, answers = _exec_in_background(server, sandbox_id, "sleep 20; echo late")
            time.sleep(1.5)
            started = time.monotonic()
            os.kill(_vmm_pid(server, sandbox_id), signal.SIGKILL)
            thread.join(ANSWER_BOUND_S)
            answered_s = time.monotonic() - started
            assert not thread.is_alive(), "the exec was not answered"
            (answer,) = answers
            assert isinstance(answer, httpx.Response), answer
            assert answer.status_code == 502, answer.text
            assert answer.json()["error"]["type"] in ("AgentDisconnected", "VMMCrashed")
            record = wait_for_state(client, sandbox_id, {"error"}, within_s=ANSWER_BOUND_S)
            assert record["error"]
            assert_cleaned_up(server, sandbox_id)
            again = client.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"cmd": "true"})
            assert again.status_code == 409, again.text
            assert client.delete(f"/v1/sandboxes/{sandbox_id}").status_code == 204
            bystander.check()
            case.outcome = (
                f"{answer.json()['error']['type']} (502) in {answered_s:.1f} s; "
                f"state error ({record['error']}); nothing left"
            )


def test_sigkill_of_the_server_mid_exec_then_restart(
    bystander: Bystander, hostile_case: HostileCase
) -> None:
    """Server SIGKILLed mid-exec (with a warm-pool VM and a second sandbox whose VMM dies
    meanwhile): the restart re-attaches the live sandbox (its acknowledged file intact),
    marks the dead one `error`, and removes the orphan pool VM, work dirs and cgroups."""
    data_dir = short_tmp_dir("eb-hostile-restart-")
    try:
        with hostile_case("SIGKILL of the server mid-exec, restart", "reconcile at start") as case:
            case.sampler.data_dir = data_dir
            with serve_emberbox(data_dir, EMBERBOX_POOL_SIZE="1") as raw:
                first = HostileServer(raw, {"EMBERBOX_POOL_SIZE": "1"})
                case.sampler.server_pid = first.pid
                with first.client() as client:
                    alive = first.create(client, metadata={"role": "alive"})
                    put_acknowledged(client, alive, b"survives the server\n")
                    doomed = first.create(client, metadata={"role": "doomed"})
                pooled = _wait_for_pool_vm(data_dir, {alive, doomed})
                thread, answers = _exec_in_background(first, alive, "sleep 5; echo late")
                time.sleep(1.5)
                first.server.process.kill()
                first.server.process.wait(10)
                thread.join(ANSWER_BOUND_S)
                assert answers and isinstance(answers[0], httpx.TransportError), answers
                os.kill(_vmm_pid(first, doomed), signal.SIGKILL)
            with hostile_server({"EMBERBOX_POOL_SIZE": "0"}, data_dir=data_dir) as second:
                case.sampler.server_pid = second.pid
                with second.client() as client:
                    listing = client.get("/v1/sandboxes").json()["sandboxes"]
                    states = {s["id"]: (s["state"], s["error"]) for s in listing}
                    assert states[alive] == ("running", None), states
                    assert states[doomed][0] == "error" and states[doomed][1], states
                    assert pooled not in states or states[pooled][0] in ("error", "stopped")
                    url = f"/v1/sandboxes/{alive}"
                    again = client.post(f"{url}/exec", json={"cmd": "echo again"})
                    assert again.json()["stdout"] == "again\n", again.text
                    ack = client.get(f"{url}/files", params={"path": ACK_PATH})
                    assert ack.content == b"survives the server\n"
                    assert_cleaned_up(second, doomed)
                    assert_cleaned_up(second, pooled)
                    assert sorted(p.name for p in (data_dir / "vms").iterdir()) == [alive]
                    assert qemu_pids_under(data_dir) == [_vmm_pid(second, alive)]
                bystander.check()
                case.outcome = "live sandbox re-attached, dead one error, pool orphan removed"
    finally:
        for pid in qemu_pids_under(data_dir):  # only if the test failed half-way
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(data_dir, ignore_errors=True)


def _wait_for_pool_vm(data_dir: Path, known: set[str]) -> str:
    """The id of the warm-pool VM once it runs (a work dir no sandbox of ours has)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        extra = [p for p in (data_dir / "vms").iterdir() if p.name not in known]
        if extra and qemu_pids_under(extra[0]):
            return extra[0].name
        time.sleep(0.2)
    raise AssertionError("the warm pool did not start a VM within 60 s")
