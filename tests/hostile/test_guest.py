"""Hostile guests: commands that attack their own VM, its agent and its channel.

Each case proves (a) the attack stays inside the VM (and names the layer that stopped
it), (b) the host, the server and a bystander sandbox stay healthy, and (c) what was
acknowledged before the attack (a synced file, the sandbox record) is still there.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from emberbox.config import Settings
from tests.support.hostile import (
    ACK_PATH,
    Bystander,
    HostileCase,
    HostileServer,
    assert_cleaned_up,
    put_acknowledged,
    wait_for_state,
)
from tests.support.measure import MIB, rss_and_cpu
from tests.support.paths import qemu_pids_under

pytestmark = [pytest.mark.vm]

RECOVER_S = 30.0  # a victim answers again within this once its attack has been stopped
GIB = 1 << 30
GARBAGE_PY = Path(__file__).with_name("guest_garbage.py")


@dataclass
class Victim:
    client: httpx.Client
    sandbox_id: str
    content: bytes

    @property
    def url(self) -> str:
        return f"/v1/sandboxes/{self.sandbox_id}"

    def exec(self, cmd: str, timeout_s: float, **extra: Any) -> httpx.Response:
        body = {"cmd": cmd, "timeout_s": timeout_s, **extra}
        return self.client.post(f"{self.url}/exec", json=body)

    def assert_usable(self, within_s: float = RECOVER_S) -> float:
        """It runs a command and still holds its acknowledged file; seconds it took."""
        started = time.monotonic()
        response = self.exec("echo usable", timeout_s=within_s)
        while response.status_code != 200 and time.monotonic() - started < within_s:
            response = self.exec("echo usable", timeout_s=within_s)
        assert response.status_code == 200, response.text
        assert response.json()["stdout"] == "usable\n"
        ack = self.client.get(f"{self.url}/files", params={"path": ACK_PATH})
        assert ack.content == self.content
        record = self.client.get(self.url).json()
        assert record["state"] == "running", record
        return time.monotonic() - started


@pytest.fixture
def victim(server: HostileServer, bystander: Bystander) -> Iterator[Victim]:
    """A sandbox that attacks itself; killed afterwards, and nothing of it may remain."""
    with server.client() as client:
        sandbox_id = server.create(client, metadata={"role": "victim"})
        content = f"acknowledged by {sandbox_id}\n".encode()
        put_acknowledged(client, sandbox_id, content)
        yield Victim(client, sandbox_id, content)
        assert client.delete(f"/v1/sandboxes/{sandbox_id}").status_code == 204
        assert_cleaned_up(server, sandbox_id)


def test_fork_bomb(victim: Victim, bystander: Bystander, hostile_case: HostileCase) -> None:
    """A fork bomb in the command's group dies at its timeout (the agent runs ahead of
    it); one that escapes the group (setsid) swamps only its own VM, whose agent still
    answers and which can be killed; the bystander answers throughout."""
    with hostile_case(
        "fork bomb", "agent (PID 1, SCHED_FIFO) kills the group at the timeout"
    ) as case:
        started = time.monotonic()
        response = victim.exec("f(){ f|f& }; f; sleep 30", timeout_s=2)
        answered = time.monotonic() - started
        assert response.status_code == 200, response.text
        assert response.json()["timed_out"] is True
        assert answered < 15
        recovered = victim.assert_usable()
        bystander.check()
        case.outcome = (
            f"timed_out, answered in {answered:.1f} s; usable again {recovered:.1f} s later"
        )
    with hostile_case("fork bomb escaping its group (setsid)", "VM boundary; kill") as case:
        escaped = "setsid -f sh -c 'f(){ f|f& }; f' </dev/null >/dev/null 2>&1; echo launched"
        response = victim.exec(escaped, timeout_s=10)
        assert response.status_code == 200, response.text
        time.sleep(3)
        during = bystander.check()  # while the bomb still rages in the victim
        started = time.monotonic()  # the victim's agent (no fork needed) still answers
        stat = victim.client.get(f"{victim.url}/files/stat", params={"path": ACK_PATH})
        assert stat.status_code == 200, stat.text
        agent_s = time.monotonic() - started
        assert agent_s < 10
        started = time.monotonic()
        assert victim.client.delete(victim.url).status_code == 204
        killed_s = time.monotonic() - started
        assert killed_s < 15
        assert victim.client.get(victim.url).json()["state"] == "stopped"
        bystander.check()
        case.outcome = (
            f"during it: bystander answered in {during:.2f} s, victim's agent in "
            f"{agent_s:.2f} s; victim killed in {killed_s:.1f} s"
        )


def test_cpu_spin_past_the_timeout(
    victim: Victim, bystander: Bystander, hostile_case: HostileCase
) -> None:
    """A busy loop is killed at its exec timeout; the answer comes right after it."""
    with hostile_case("CPU spin past the exec timeout", "guest: exec timeout (SIGKILL)") as case:
        started = time.monotonic()
        response = victim.exec("while :; do :; done", timeout_s=3)
        elapsed = time.monotonic() - started
        assert response.status_code == 200, response.text
        result = response.json()
        assert (result["timed_out"], result["exit_code"], result["signal"]) == (True, 137, 9)
        assert 3 <= elapsed < 10
        victim.assert_usable()
        bystander.check()
        case.outcome = f"timed_out after {elapsed:.1f} s (timeout 3 s), exit 137"


def test_memory_exhaustion(
    victim: Victim, bystander: Bystander, server: HostileServer, hostile_case: HostileCase
) -> None:
    """A guest allocating without end meets its own OOM killer; the VMM stays under
    guest RAM + overhead on the host."""
    settings = Settings()
    hog = "python3 -c 'a=[]\nwhile True: a.append(bytearray(1<<24))'; echo rc=$?"
    with hostile_case("memory exhaustion", "guest kernel OOM killer (VM RAM size)") as case:
        response = victim.exec(hog, timeout_s=60)
        assert response.status_code == 200, response.text
        assert response.json()["stdout"] == "rc=137\n"  # SIGKILLed by the guest's OOM killer
        victim.assert_usable()
        bystander.check()
        case.outcome = "hog SIGKILLed by the guest OOM killer; agent (PID 1) spared"
    record = victim.client.get(victim.url).json()
    ceiling = (record["memory_mib"] + settings.vmm_memory_overhead_mib) * MIB
    assert 0 < _qemu_rss(server, victim.sandbox_id) <= ceiling


def test_a_gigabyte_to_stdout(
    victim: Victim, bystander: Bystander, server: HostileServer, hostile_case: HostileCase
) -> None:
    """1 GiB written to stdout: the answer carries at most the output cap, marked
    truncated, and the server's memory stays bounded. (Under TCG the guest moves about
    20-50 MB/s, so the exec timeout usually ends the writer before its last byte.)"""
    cap = Settings().exec_output_max_bytes
    cmd = f"yes 0123456789abcdef | head -c {GIB}"
    with hostile_case("1 GiB to stdout", "agent output cap + exec timeout") as case:
        response = victim.exec(cmd, timeout_s=20)
        assert response.status_code == 200, response.text[:500]
        result = response.json()
        assert result["output_truncated"] is True
        assert 0 < len(result["stdout"]) <= cap
        ended = "exec timeout" if result["timed_out"] else "its end"
        del response, result
        victim.assert_usable()
        bystander.check()
        case.outcome = f"answer truncated at {cap // MIB} MiB; writer ran to {ended}"


def test_a_gigabyte_to_the_serial_console(
    victim: Victim, bystander: Bystander, server: HostileServer, hostile_case: HostileCase
) -> None:
    """1 GiB to /dev/ttyS0 and /dev/console as root: the host keeps at most the console
    log cap on disk, and the exec timeout ends the writer."""
    cap = Settings().console_log_max_bytes
    log = server.data_dir / "vms" / victim.sandbox_id / "console.log"
    with hostile_case("1 GiB to the serial console", "console log cap + exec timeout") as case:
        for device in ("/dev/ttyS0", "/dev/console"):
            response = victim.exec(f"head -c {GIB} /dev/zero | tr '\\0' x > {device}", 4)
            assert response.status_code == 200, response.text
            assert response.json()["timed_out"] is True
            assert log.stat().st_size <= cap + 1024  # the cap and its one-line note
        victim.assert_usable()
        bystander.check()
        case.outcome = f"console.log {log.stat().st_size // 1024} KiB (cap {cap // 1024} KiB)"


def test_filling_the_guest_disk(
    victim: Victim, bystander: Bystander, server: HostileServer, hostile_case: HostileCase
) -> None:
    """dd until the guest's root is full: ENOSPC in the guest, an overlay no larger than
    the guest's disk on the host, the acknowledged file intact, and room again after rm."""
    overlay = server.data_dir / "vms" / victim.sandbox_id / "overlay.qcow2"
    with hostile_case("filling the guest disk", "guest disk size (qcow2 overlay)") as case:
        response = victim.exec("dd if=/dev/zero of=/fill bs=4M 2>&1; df -k / | tail -1", 150)
        assert response.status_code == 200, response.text
        out = response.json()["stdout"]
        assert "No space left on device" in out, out
        disk_bytes = int(out.split()[-5]) * 1024  # df: size, used, available, use%, mount
        assert overlay.stat().st_size <= disk_bytes + 256 * MIB
        victim.assert_usable()  # the acknowledged file (same disk) is still there
        again = victim.exec("rm /fill && echo room > /root/after && cat /root/after", 30)
        assert again.json()["stdout"] == "room\n", again.text
        bystander.check()
        case.outcome = f"guest ENOSPC; overlay {overlay.stat().st_size // MIB} MiB on the host"


def test_sleep_forever(victim: Victim, bystander: Bystander, hostile_case: HostileCase) -> None:
    """`sleep infinity` ends at its exec timeout and the sandbox stays usable."""
    with hostile_case("sleep forever", "guest: exec timeout") as case:
        started = time.monotonic()
        response = victim.exec("sleep infinity", timeout_s=2)
        elapsed = time.monotonic() - started
        assert response.status_code == 200, response.text
        assert response.json()["timed_out"] is True
        assert elapsed < 8
        victim.assert_usable(within_s=5)
        bystander.check()
        case.outcome = f"timed_out after {elapsed:.1f} s; usable at once"


def test_killing_the_agent_and_every_process(
    victim: Victim, bystander: Bystander, hostile_case: HostileCase
) -> None:
    """Every signal to PID 1 (the agent) is ignored or survived, and `kill -9 -1` kills
    the guest's processes but not the agent: the exec itself is answered."""
    signals = " ".join(f"kill -{s} 1;" for s in ("KILL", "TERM", "INT", "HUP", "QUIT", "SEGV"))
    with hostile_case(
        "killing the agent (PID 1)", "kernel init protection; agent ignores SIGINT"
    ) as case:
        response = victim.exec(f"{signals} kill -STOP 1; kill -CONT 1; echo survived", 10)
        assert response.status_code == 200, response.text
        assert response.json()["stdout"] == "survived\n"
        victim.assert_usable(within_s=5)
        bystander.check()
        case.outcome = "KILL TERM INT HUP QUIT SEGV STOP to PID 1: exec answered, agent alive"
    with hostile_case("kill -9 -1 in the guest", "kernel: PID 1 and the caller spared") as case:
        response = victim.exec("sleep 60 & kill -9 -1; echo alive", 10)
        assert response.status_code == 200, response.text
        assert response.json()["stdout"] == "alive\n"
        victim.assert_usable(within_s=5)
        bystander.check()
        case.outcome = "every other process killed; exec answered, agent alive"


def test_garbage_on_the_agent_channel(
    victim: Victim, bystander: Bystander, server: HostileServer, hostile_case: HostileCase
) -> None:
    """The agent's port cannot be opened twice (EBUSY); a guest that steals the agent's
    own descriptor (pidfd_getfd) and writes garbage gets a ProtocolError and its sandbox
    is ended (`error`, nothing left), while the bystander carries on."""
    script = GARBAGE_PY.read_bytes()
    put = victim.client.put(f"{victim.url}/files", params={"path": "/root/g.py"}, content=script)
    assert put.status_code == 200, put.text
    with hostile_case(
        "garbage written to the agent channel", "host frame check; sandbox ended"
    ) as case:
        opened = victim.exec("python3 /root/g.py open", timeout_s=20)
        assert opened.status_code == 200, opened.text
        assert "Device or resource busy" in opened.json()["stdout"], opened.text
        victim.assert_usable(within_s=5)
        started = time.monotonic()
        stolen = victim.exec("python3 /root/g.py steal", timeout_s=20)
        assert stolen.status_code == 502, stolen.text
        assert stolen.json()["error"]["type"] == "ProtocolError", stolen.text
        record = wait_for_state(victim.client, victim.sandbox_id, {"error"}, within_s=10)
        assert record["error"]
        assert_cleaned_up(server, victim.sandbox_id)
        bystander.check()
        case.outcome = (
            f"502 ProtocolError, sandbox error + torn down in {time.monotonic() - started:.1f} s"
        )


def _qemu_rss(server: HostileServer, sandbox_id: str) -> int:
    pids = qemu_pids_under(server.data_dir / "vms" / sandbox_id)
    return sum(rss_and_cpu(pid)[0] for pid in pids)
