"""Through one API replica, a sandbox on each of the three hosts: exec, streamed exec,
files up and down, and a PTY over WebSocket all reach the right VM (issue 18)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from emberbox.sdk import Sandbox
from tests.support.cluster_rig import HOSTS, Rig

pytestmark = [pytest.mark.vm]


@pytest.fixture(scope="module")
def on_each_host(rig: Rig) -> Iterator[dict[str, Sandbox]]:
    """Three of alice's sandboxes made on replica 0: placement puts one on each host
    (each create once the hosts have reported the last one: placement under that lag is
    test_cluster_placement.py's subject)."""
    url, key = rig.replicas[0].url, rig.keys["alice"]
    made: list[Sandbox] = []
    try:
        for _ in HOSTS:
            rig.wait_hosts_report(HOSTS)
            made.append(Sandbox.create(url=url, api_key=key, metadata={"suite": "api"}))
        by_host = {rig.host_of(sb.id)[0]: sb for sb in made}
        assert sorted(h for h in by_host if h) == sorted(HOSTS), "creates did not spread"
        yield {host: sb for host, sb in by_host.items() if host}
    finally:
        for sb in made:
            sb.kill()
            sb.close()


@pytest.mark.parametrize("host", HOSTS)
def test_exec_reaches_the_vm_on_each_host(
    rig: Rig, on_each_host: dict[str, Sandbox], host: str
) -> None:
    """exec through the replica runs in the VM that the host's own QEMU runs."""
    sb = on_each_host[host]
    assert sb.id in rig.vm_ids_on(host)  # the VM is a QEMU under that host's data dir
    result = sb.commands.run(["sh", "-c", "echo $((6*7)); echo err >&2; exit 3"])
    assert (result.stdout, result.stderr, result.exit_code) == ("42\n", "err\n", 3)
    assert sb.info().state == "running"


@pytest.mark.parametrize("host", HOSTS)
def test_exec_output_streams_through_the_replica(
    rig: Rig, on_each_host: dict[str, Sandbox], host: str
) -> None:
    """The first line arrives while the command still runs: the command waits for a file
    that the output callback writes on seeing it (a buffering proxy would deadlock until
    the command's timeout, and the result would say timed_out)."""
    sb = on_each_host[host]
    script = "echo first; while [ ! -e /tmp/go ]; do sleep 0.1; done; echo second"
    seen: list[str] = []
    other = Sandbox(sb.id, url=rig.replicas[0].url, api_key=rig.keys["alice"])

    def on_stdout(text: str) -> None:
        seen.append(text)
        if "first" in text and len(seen) == 1:
            other.files.write("/tmp/go", b"")

    try:
        result = sb.commands.run(["sh", "-c", script], timeout_s=60, on_stdout=on_stdout)
    finally:
        other.close()
    assert not result.timed_out and result.exit_code == 0
    assert result.stdout == "first\nsecond\n"
    assert "".join(seen) == "first\nsecond\n" and "second" not in seen[0]


@pytest.mark.parametrize("host", HOSTS)
def test_files_go_up_and_come_back_whole(
    on_each_host: dict[str, Sandbox], host: str, tmp_path: Path
) -> None:
    """A 3 MiB random file uploaded through the replica is the same bytes in the VM
    (sha256 computed by the guest) and downloaded back."""
    sb = on_each_host[host]
    data = os.urandom(3 << 20)
    local = tmp_path / "up.bin"
    local.write_bytes(data)
    assert sb.files.upload(local, "/tmp/up.bin") == len(data)
    in_guest = sb.commands.run(["sha256sum", "/tmp/up.bin"]).stdout.split()[0]
    assert in_guest == hashlib.sha256(data).hexdigest()
    back = tmp_path / "down.bin"
    assert sb.files.download("/tmp/up.bin", back) == len(data)
    assert back.read_bytes() == data
    assert {f.name for f in sb.files.list("/tmp")} >= {"up.bin"}


@pytest.mark.parametrize("host", HOSTS)
def test_pty_over_websocket(on_each_host: dict[str, Sandbox], host: str) -> None:
    """A terminal through the replica's WebSocket: typed input runs in the VM's shell
    and its exit code comes back."""
    sb = on_each_host[host]
    with sb.pty.create(100, 30) as term:
        term.send("echo $((6*7))-$(hostname -s | wc -c)\n")
        screen = b""
        while b"42-" not in screen:
            chunk = term.recv(timeout_s=60)
            assert chunk, f"terminal ended early: {screen!r}"
            screen += chunk
        term.send("exit 7\n")
        assert term.wait(timeout_s=60) == 7
