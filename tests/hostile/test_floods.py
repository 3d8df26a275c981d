"""Hostile load on the agent link (issue #15): readers that stop reading and guests that
flood it. One server for the module, a bystander and one victim sandbox.

Before version 3 of the protocol, a follower of ``cat /dev/zero`` that stopped reading
grew the server by 621 MiB in 25 s (the host queued every frame); now the agent's
window stalls ``cat`` instead, and an agent that ignores the window is cut off.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.hostile import (
    Bystander,
    HostileCase,
    HostileServer,
    assert_cleaned_up,
    wait_for_state,
)
from tests.support.measure import MIB, rss_and_cpu

pytestmark = [pytest.mark.vm]

FLOOD_PY = Path(__file__).with_name("guest_flood.py")
STALL_S = 25.0
RSS_GROWTH_MAX = 64 * MIB


@pytest.fixture(scope="module")
def victim(server: HostileServer, bystander: Bystander) -> Iterator[tuple[httpx.Client, str]]:
    with server.client() as client:
        sandbox_id = server.create(client, metadata={"role": "victim"})
        yield client, sandbox_id
        client.delete(f"/v1/sandboxes/{sandbox_id}")
        assert_cleaned_up(server, sandbox_id)


def _peak_rss_while(server: HostileServer, seconds: float) -> int:
    peak, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        peak = max(peak, rss_and_cpu(server.pid)[0])
        time.sleep(0.25)
    return peak


def test_a_stalled_follower_of_dev_zero_keeps_the_server_bounded(
    victim: tuple[httpx.Client, str],
    server: HostileServer,
    bystander: Bystander,
    hostile_case: HostileCase,
) -> None:
    """A client that follows `cat /dev/zero` and stops reading: the server's RSS grows
    by at most 64 MiB over 25 s (the guest's producer stalls instead)."""
    client, sandbox_id = victim
    url = f"/v1/sandboxes/{sandbox_id}/processes"
    with hostile_case("follower of cat /dev/zero stops reading", "agent window") as case:
        started = client.post(url, json={"cmd": "cat /dev/zero"})
        assert started.status_code == 201, started.text
        pid = started.json()["pid"]
        before = rss_and_cpu(server.pid)[0]
        with client.stream("GET", f"{url}/{pid}/output", params={"follow": True}) as stream:
            chunks = stream.iter_raw()
            assert next(chunks)  # following, then never read again
            peak = _peak_rss_while(server, STALL_S)
        growth = peak - before
        case.outcome = f"server RSS +{growth / MIB:.1f} MiB over {STALL_S:.0f} s"
        assert growth <= RSS_GROWTH_MAX, case.outcome
        killed = client.post(f"{url}/{pid}/signal", json={"signal": "KILL"})
        assert killed.status_code in (200, 204, 409), killed.text
        answered = client.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"cmd": "echo ok"})
        assert answered.status_code == 200 and answered.json()["stdout"] == "ok\n"
        bystander.check()


def test_a_guest_flooding_valid_frames_is_cut_off(
    victim: tuple[httpx.Client, str],
    server: HostileServer,
    bystander: Bystander,
    hostile_case: HostileCase,
) -> None:
    """A guest that takes the agent's channel and writes valid frames forever, behind a
    stalled reader, ends its sandbox with a protocol violation; the server's RSS stays
    bounded and another sandbox keeps answering."""
    client, sandbox_id = victim
    base = f"/v1/sandboxes/{sandbox_id}"
    put = client.put(f"{base}/files", params={"path": "/root/f.py"}, content=FLOOD_PY.read_bytes())
    assert put.status_code == 200, put.text
    with hostile_case("valid frames flooded behind a stalled reader", "host budgets") as case:
        before = rss_and_cpu(server.pid)[0]
        body = {"cmd": "python3 /root/f.py 256 3", "timeout_s": 120, "stream": True}
        started = time.monotonic()
        with client.stream("POST", f"{base}/exec", json=body) as stream:
            assert stream.status_code == 200
            record = wait_for_state(client, sandbox_id, {"error", "dead"}, within_s=90)
        peak = rss_and_cpu(server.pid)[0]
        assert "protocol" in (record.get("error") or "").lower(), record
        case.outcome = (
            f"sandbox ended in {time.monotonic() - started:.1f} s: {record['error']}; "
            f"server RSS +{(peak - before) / MIB:.1f} MiB"
        )
        assert peak - before <= RSS_GROWTH_MAX, case.outcome
        bystander.check()
