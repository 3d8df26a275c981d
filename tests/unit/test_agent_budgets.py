"""Host-side budgets of the agent link (issue #15): a stalled consumer stalls the agent,
and an agent past its windows or its output cap breaks the protocol, whatever it claims.

The first half fakes the agent (frames written by the test); the second runs the real
agent on the host and checks that it keeps to the windows the host enforces.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from emberbox import errors
from emberbox.agent_client.client import AgentClient, ExecSpec, SpawnSpec
from emberbox.agent_client.link import CONTROL_BUDGET, DATA_BUDGET
from emberbox.guest import protocol
from emberbox.guest.protocol import Frame, Kind
from tests.support.agent import RunningAgent, running_agent

pytestmark = pytest.mark.anyio
CHUNK = protocol.DATA_CHUNK


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Agent:
    """The test's side of the stream: reads the host's frames, writes any frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self._decoder = protocol.FrameDecoder()
        self.frames: list[Frame] = []

    async def next(self, timeout_s: float = 5.0) -> Frame:
        async with asyncio.timeout(timeout_s):
            while not self.frames:
                data = await self.reader.read(65536)
                assert data, "client closed the stream"
                self.frames += self._decoder.feed(data)
        return self.frames.pop(0)

    async def acks(self, rid: int, wait_s: float = 0.3) -> list[int]:
        """The ack totals the host sent on `rid` within `wait_s`."""
        found: list[int] = []
        with pytest.raises(TimeoutError):
            while True:
                frame = await self.next(wait_s)
                if frame.rid == rid and frame.kind is Kind.EVENT:
                    event = frame.json()
                    if event.get("event") == "ack":
                        found.append(event["bytes"])
        return found

    async def send(self, *chunks: bytes) -> None:
        self.writer.write(b"".join(chunks))
        await self.writer.drain()

    async def data(self, rid: int, size: int, kind: Kind = Kind.STDOUT) -> None:
        for start in range(0, size, CHUNK):
            await self.send(protocol.encode(kind, rid, b"x" * min(CHUNK, size - start)))


@pytest.fixture
async def pair() -> AsyncIterator[tuple[AgentClient, Agent]]:
    ours, theirs = socket.socketpair()
    client = AgentClient(*await asyncio.open_unix_connection(sock=ours))
    fake = Agent(*await asyncio.open_unix_connection(sock=theirs))
    yield client, fake
    await client.aclose()
    fake.writer.close()


def wait_answer(pid: int = 7) -> dict[str, Any]:
    return {"ok": True, "pid": pid, "running": False, "exit_code": 0, "signal": None}


async def test_a_follower_acknowledges_only_what_its_consumer_took(
    pair: tuple[AgentClient, Agent],
) -> None:
    """attach acks data once its callback returned, never data still waiting."""
    client, fake = pair
    release, taken = asyncio.Event(), []

    async def slow(chunk: bytes) -> None:
        taken.append(len(chunk))
        await release.wait()

    follow = asyncio.create_task(client.attach(7, on_stdout=slow))
    rid = (await fake.next()).rid
    await fake.data(rid, protocol.WINDOW)
    assert await fake.acks(rid) == []  # the consumer holds the first chunk: nothing taken
    release.set()
    acks = await fake.acks(rid)
    assert acks and acks[-1] == protocol.WINDOW and sum(taken) == protocol.WINDOW
    await fake.send(protocol.encode_json(Kind.RESPONSE, rid, wait_answer()))
    assert (await follow).exit_code == 0


async def test_data_past_the_window_is_a_protocol_violation(
    pair: tuple[AgentClient, Agent],
) -> None:
    """An agent that sends more unacknowledged bytes than the window allows (here to a
    follower that stopped reading) fails the link with ProtocolError; nothing is queued
    past the budget."""
    client, fake = pair
    stalled = asyncio.Event()

    async def never_done(chunk: bytes) -> None:
        await stalled.wait()

    follow = asyncio.create_task(client.attach(7, on_stdout=never_done))
    rid = (await fake.next()).rid
    await fake.data(rid, DATA_BUDGET)
    await asyncio.sleep(0.1)
    assert not client.closed
    await fake.data(rid, CHUNK)
    await asyncio.sleep(0.1)
    assert client.closed and client._link.pending_bytes == 0  # what was queued is dropped
    stalled.set()  # the consumer takes the chunk it held, then finds the link broken
    with pytest.raises(errors.ProtocolError, match="unacknowledged"):
        await asyncio.wait_for(follow, 5)
    assert client.closed
    with pytest.raises(errors.ProtocolError):
        await client.ping()


async def test_exec_output_is_capped_on_the_host(pair: tuple[AgentClient, Agent]) -> None:
    """An exec whose agent sends more than the output cap, acknowledged or not, is a
    ProtocolError; up to the cap it is kept whole."""
    client, fake = pair
    within = asyncio.create_task(client.exec(ExecSpec(["x"], output_max_bytes=100_000)))
    rid = (await fake.next()).rid
    await fake.data(rid, 60_000)
    await fake.data(rid, 40_000, Kind.STDERR)
    answer = {"ok": True, "exit_code": 0, "duration_ms": 1.0}
    await fake.send(protocol.encode_json(Kind.RESPONSE, rid, answer))
    result = await within
    assert (len(result.stdout), len(result.stderr)) == (60_000, 40_000)
    past = asyncio.create_task(client.exec(ExecSpec(["x"], output_max_bytes=100_000)))
    rid = (await fake.next()).rid
    await fake.data(rid, 100_001)
    with pytest.raises(errors.ProtocolError, match="cap 100000"):
        await asyncio.wait_for(past, 5)


async def test_exec_without_a_cap_gets_the_default(pair: tuple[AgentClient, Agent]) -> None:
    """An exec spec without output_max_bytes goes out with the host's default cap."""
    client, fake = pair
    run = asyncio.create_task(client.exec(ExecSpec(["x"])))
    request = await fake.next()
    assert request.json()["output_max_bytes"] == 16 << 20
    run.cancel()


async def test_a_flood_of_events_is_a_protocol_violation(pair: tuple[AgentClient, Agent]) -> None:
    """JSON frames that pile up on a call past CONTROL_BUDGET fail the link (empty
    ones too: each costs its bookkeeping)."""
    client, fake = pair
    stalled = asyncio.Event()

    async def never_done(chunk: bytes) -> None:
        await stalled.wait()

    follow = asyncio.create_task(client.attach(7, on_stdout=never_done))
    rid = (await fake.next()).rid
    await fake.data(rid, CHUNK)  # the consumer now waits: events queue behind it
    event = protocol.encode_json(Kind.EVENT, rid, {"event": "noise"})
    await fake.send(event * (CONTROL_BUDGET // 100 + 1))
    await asyncio.sleep(0.1)
    assert client.closed
    stalled.set()
    with pytest.raises(errors.ProtocolError, match="answers waiting"):
        await asyncio.wait_for(follow, 5)


async def test_frames_for_unknown_requests_hold_nothing(pair: tuple[AgentClient, Agent]) -> None:
    """Data for rids with no open call is dropped as it comes: the link holds no bytes."""
    client, fake = pair
    await fake.data(4242, 4 * DATA_BUDGET)
    ping = asyncio.create_task(client.ping())
    rid = (await fake.next()).rid
    await fake.send(protocol.encode_json(Kind.RESPONSE, rid, {"ok": True}))
    await ping
    assert client._link.pending_bytes == 0
    assert not client.closed


# -- the real agent keeps to the windows ---------------------------------------------------


@pytest.fixture
def agent() -> Iterator[RunningAgent]:
    with running_agent() as started:
        yield started


async def _received_without_acks(agent: RunningAgent, request: dict[str, Any]) -> int:
    """Data bytes the agent sends on one request whose data is never acknowledged."""
    reader, writer = await asyncio.open_unix_connection(agent.socket_path)
    writer.write(protocol.encode_json(Kind.REQUEST, 1, request))
    decoder, received = protocol.FrameDecoder(), 0
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(3):
            while data := await reader.read(1 << 20):
                received += sum(len(f.payload) for f in decoder.feed(data) if f.rid == 1)
    writer.close()
    return received


async def test_the_agent_windows_a_followed_process(agent: RunningAgent) -> None:
    """attach to `cat /dev/zero` with no acks: the agent stops at the window."""
    async with await agent.connect() as client:
        pid = await client.spawn(SpawnSpec("cat /dev/zero"))
        received = await _received_without_acks(agent, {"op": "attach", "pid": pid})
        await client.signal(pid, "KILL")
    assert protocol.WINDOW <= received <= DATA_BUDGET


async def test_the_agent_windows_exec_output(agent: RunningAgent) -> None:
    """An exec of `cat /dev/zero` with no acks: the agent stops at the window."""
    request = {"op": "exec", "shell": "cat /dev/zero", "timeout_s": 5}
    received = await _received_without_acks(agent, request)
    assert protocol.WINDOW <= received <= DATA_BUDGET
