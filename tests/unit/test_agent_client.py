"""AgentClient against a scripted fake agent on the other end of a socketpair."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from emberbox import errors
from emberbox.agent_client import client as client_module
from emberbox.agent_client.client import AgentClient, ExecLimits, ExecSpec, SpawnSpec
from emberbox.guest import protocol
from emberbox.guest.protocol import Frame, Kind

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeAgent:
    """The test's side of the stream: reads requests, writes whatever frames it likes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self._decoder = protocol.FrameDecoder()
        self._frames: list[Frame] = []

    async def request(self, timeout_s: float = 5.0) -> Frame:
        async with asyncio.timeout(timeout_s):
            while not self._frames:
                data = await self.reader.read(65536)
                assert data, "client closed the stream"
                self._frames += self._decoder.feed(data)
        return self._frames.pop(0)

    async def send(self, *chunks: bytes) -> None:
        self.writer.write(b"".join(chunks))
        await self.writer.drain()

    async def answer(self, rid: int, body: dict[str, Any]) -> None:
        await self.send(protocol.encode_json(Kind.RESPONSE, rid, body))

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def hello_answer(version: int = protocol.PROTOCOL_VERSION) -> dict[str, Any]:
    return {
        "ok": True,
        "protocol": version,
        "agent_version": "0.1.0",
        "boot_time": 1.5,
        "kernel": "6.1",
        "warnings": ["set clock: nope"],
    }


@pytest.fixture
async def pair() -> AsyncIterator[tuple[AgentClient, FakeAgent]]:
    ours, theirs = socket.socketpair()
    client = AgentClient(*await asyncio.open_unix_connection(sock=ours))
    fake = FakeAgent(*await asyncio.open_unix_connection(sock=theirs))
    yield client, fake
    await client.aclose()
    await fake.close()


async def test_hello_resent_until_answered(pair: tuple[AgentClient, FakeAgent]) -> None:
    """An unanswered hello is sent again with a new rid, and the answer to it completes."""
    client, fake = pair
    handshake = asyncio.create_task(client.handshake(timeout_s=10, hostname="box"))
    first = await fake.request()
    second = await fake.request(timeout_s=2.0)
    assert second.rid != first.rid
    body = first.json()
    assert body["op"] == "hello" and body["hostname"] == "box"
    assert isinstance(body["time_ns"], int)
    assert len(base64.b64decode(body["entropy"])) == 64
    await fake.answer(second.rid, hello_answer())
    info = await handshake
    assert (info.protocol, info.kernel, info.boot_time) == (protocol.PROTOCOL_VERSION, "6.1", 1.5)
    assert info.warnings == ("set clock: nope",)


async def test_late_answers_are_dropped(pair: tuple[AgentClient, FakeAgent]) -> None:
    """Answers to given-up hellos and to unknown rids are ignored; the client keeps working."""
    client, fake = pair
    handshake = asyncio.create_task(client.handshake(timeout_s=10, set_time=False))
    first, second = await fake.request(), await fake.request(timeout_s=2.0)
    assert first.json()["time_ns"] is None
    await fake.answer(second.rid, hello_answer())
    await handshake
    await fake.answer(first.rid, hello_answer(version=99))  # late, and would be wrong
    await fake.answer(4242, {"ok": True})
    await fake.send(protocol.encode(Kind.STDOUT, 4243, b"stray"))
    ping = asyncio.create_task(client.ping())
    await fake.answer((await fake.request()).rid, {"ok": True})
    await ping
    assert not client.closed


async def test_handshake_times_out(pair: tuple[AgentClient, FakeAgent]) -> None:
    """With no answer at all, BootTimeout comes after timeout_s, having resent the hello."""
    client, fake = pair
    with pytest.raises(errors.BootTimeout, match=r"within 1\.2 s"):
        await client.handshake(timeout_s=1.2)
    rids = {(await fake.request(timeout_s=0.1)).rid for _ in range(2)}
    assert len(rids) == 2


async def test_protocol_mismatch(pair: tuple[AgentClient, FakeAgent]) -> None:
    """An agent answering with another protocol number (an old image's) is a ProtocolError."""
    client, fake = pair
    handshake = asyncio.create_task(client.handshake(timeout_s=5))
    await fake.answer((await fake.request()).rid, hello_answer(version=1))
    with pytest.raises(
        errors.ProtocolError, match=f"protocol 1, we speak {protocol.PROTOCOL_VERSION}"
    ):
        await handshake


async def test_garbage_fails_everything_with_protocol_error(
    pair: tuple[AgentClient, FakeAgent],
) -> None:
    """Bytes that are not frames fail pending and later requests and close the client."""
    client, fake = pair
    pending = asyncio.create_task(client.exec(ExecSpec(["sleep", "1"])))
    await fake.request()
    await fake.send(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    with pytest.raises(errors.ProtocolError, match="broke the protocol: bad frame magic"):
        await pending
    assert client.closed
    with pytest.raises(errors.ProtocolError):
        await client.ping()
    assert await fake.reader.read() == b""  # the client hung up


async def test_eof_disconnects_pending_and_future(pair: tuple[AgentClient, FakeAgent]) -> None:
    """The peer closing fails a pending exec and every later request with AgentDisconnected."""
    client, fake = pair
    pending = asyncio.create_task(client.exec(ExecSpec("sleep 10")))
    await fake.request()
    await fake.close()
    with pytest.raises(errors.AgentDisconnected):
        await pending
    with pytest.raises(errors.AgentDisconnected):
        await client.ping()


async def test_out_of_order_responses_routed_by_rid(pair: tuple[AgentClient, FakeAgent]) -> None:
    """Interleaved output and answers of two execs each reach their own caller."""
    client, fake = pair
    a = asyncio.create_task(client.exec(ExecSpec(["a"])))
    b = asyncio.create_task(client.exec(ExecSpec(["b"])))
    rids = {}
    for _ in range(2):
        request = await fake.request()
        rids[request.json()["argv"][0]] = request.rid
    rid_a, rid_b = rids["a"], rids["b"]
    await fake.send(
        protocol.encode(Kind.STDOUT, rid_b, b"out-b"),
        protocol.encode(Kind.STDOUT, rid_a, b"out-a"),
        protocol.encode(Kind.STDERR, rid_a, b"err-a"),
        protocol.encode_json(Kind.RESPONSE, rid_b, {"ok": True, "exit_code": 2, "duration_ms": 1}),
        protocol.encode(Kind.STDOUT, rid_a, b"-more"),
        protocol.encode_json(Kind.RESPONSE, rid_a, {"ok": True, "exit_code": 0, "duration_ms": 1}),
    )
    result_a, result_b = await a, await b
    assert (result_a.exit_code, result_a.stdout, result_a.stderr) == (0, b"out-a-more", b"err-a")
    assert (result_b.exit_code, result_b.stdout, result_b.stderr) == (2, b"out-b", b"")


@pytest.mark.parametrize(
    ("wire", "cls"),
    [
        ("InvalidRequest", errors.InvalidRequest),
        ("NotFound", errors.NotFound),
        ("Conflict", errors.Conflict),
    ],
)
async def test_error_answers_mapped(
    pair: tuple[AgentClient, FakeAgent], wire: str, cls: type[errors.EmberboxError]
) -> None:
    """InvalidRequest, NotFound and Conflict answers raise those classes, others
    AgentRequestFailed."""
    client, fake = pair
    bad = asyncio.create_task(client.request("frobnicate"))
    await fake.answer((await fake.request()).rid, protocol.error_payload(wire, "no"))
    with pytest.raises(cls, match="no"):
        await bad
    broken = asyncio.create_task(client.ping())
    await fake.answer((await fake.request()).rid, protocol.error_payload("AgentError", "boom"))
    with pytest.raises(errors.AgentRequestFailed, match="boom"):
        await broken
    assert not client.closed


async def test_async_callbacks_awaited(pair: tuple[AgentClient, FakeAgent]) -> None:
    """Coroutine callbacks get each chunk in order, and output is still collected."""
    client, fake = pair
    seen: list[bytes] = []

    async def on_stdout(chunk: bytes) -> None:
        await asyncio.sleep(0.01)
        seen.append(chunk)

    running = asyncio.create_task(client.exec(ExecSpec(["x"]), on_stdout=on_stdout))
    rid = (await fake.request()).rid
    await fake.send(
        protocol.encode(Kind.STDOUT, rid, b"1"), protocol.encode(Kind.STDOUT, rid, b"2")
    )
    await fake.answer(rid, {"ok": True, "exit_code": 0, "duration_ms": 3.5})
    result = await running
    assert seen == [b"1", b"2"] and result.stdout == b"12"


async def test_exec_timeout_when_agent_silent(
    pair: tuple[AgentClient, FakeAgent], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent that never answers an exec yields ExecTimeout after timeout_s + grace."""
    client, _ = pair
    monkeypatch.setattr(client_module, "EXEC_GRACE_S", 0.2)
    with pytest.raises(errors.ExecTimeout) as caught:
        await client.exec(ExecSpec(["sleep", "9"], timeout_s=0.1))
    assert caught.value.result is None


async def test_ready_event_noted(pair: tuple[AgentClient, FakeAgent]) -> None:
    """The agent's unsolicited ready event on rid 0 sets client.ready."""
    client, fake = pair
    event = {"event": "ready", "agent_version": "0.1.0", "protocol": 1}
    await fake.send(protocol.encode_json(Kind.EVENT, 0, event))
    async with asyncio.timeout(2):
        await client.ready.wait()


async def test_aclose_fails_pending_and_is_idempotent(
    pair: tuple[AgentClient, FakeAgent],
) -> None:
    """aclose() twice is fine; a request pending at close raises AgentDisconnected."""
    client, fake = pair
    pending = asyncio.create_task(client.ping())
    await fake.request()
    await client.aclose()
    await client.aclose()
    with pytest.raises(errors.AgentDisconnected):
        await pending
    assert client.closed


async def test_shutdown_tolerates_channel_closing(pair: tuple[AgentClient, FakeAgent]) -> None:
    """shutdown() returns normally when the agent powers off without answering."""
    client, fake = pair
    shutdown = asyncio.create_task(client.shutdown())
    assert (await fake.request()).json() == {"op": "shutdown"}
    await fake.close()
    await shutdown


async def next_chunk(reader: AsyncIterator[bytes]) -> bytes:
    return await anext(reader)


async def test_upload_waits_for_the_window(pair: tuple[AgentClient, FakeAgent]) -> None:
    """An upload sends at most WINDOW unacknowledged bytes, then resumes on an ack."""
    client, fake = pair
    data = bytes(protocol.WINDOW + 3 * protocol.DATA_CHUNK)
    upload = asyncio.create_task(client.write_file("/f", data))
    rid = (await fake.request()).rid
    received = 0
    while received < protocol.WINDOW:
        frame = await fake.request()
        assert (frame.kind, frame.rid) == (Kind.STDIN, rid)
        received += len(frame.payload)
    with pytest.raises(TimeoutError):
        await fake.request(timeout_s=0.3)  # the window is full
    await fake.send(protocol.encode_json(Kind.EVENT, rid, {"event": "ack", "bytes": received}))
    rest = [await fake.request() for _ in range(4)]
    assert [len(f.payload) for f in rest] == [protocol.DATA_CHUNK] * 3 + [0]  # then the end
    await fake.answer(rid, {"ok": True, "written": len(data)})
    assert await upload == len(data)


async def test_download_acknowledges_what_was_taken(pair: tuple[AgentClient, FakeAgent]) -> None:
    """A download acks every ACK_EVERY bytes its consumer took, and ends on the answer."""
    client, fake = pair
    reader = client.read_file("/f")
    first = asyncio.create_task(next_chunk(reader))
    request = await fake.request()
    assert request.json() == {"op": "read", "path": "/f", "offset": 0, "length": None}
    chunk = bytes(protocol.DATA_CHUNK)
    frames = protocol.ACK_EVERY // protocol.DATA_CHUNK + 1
    await fake.send(*(protocol.encode(Kind.STDOUT, request.rid, chunk) for _ in range(frames)))
    await fake.answer(request.rid, {"ok": True, "size": frames * len(chunk), "read": 0})
    taken = [await first] + [chunk async for chunk in reader]
    assert sum(map(len, taken)) == frames * len(chunk)
    ack = await fake.request()
    assert (ack.kind, ack.json()) == (Kind.EVENT, {"event": "ack", "bytes": protocol.ACK_EVERY})


async def test_abandoned_calls_are_cancelled(pair: tuple[AgentClient, FakeAgent]) -> None:
    """A cancelled request and a download closed early each tell the agent to cancel."""
    client, fake = pair
    pending = asyncio.create_task(client.exec(ExecSpec(["sleep", "9"])))
    rid = (await fake.request()).rid
    pending.cancel()
    cancel = await fake.request()
    assert (cancel.kind, cancel.rid, cancel.json()) == (Kind.EVENT, rid, {"event": "cancel"})
    reader = client.read_file("/f")
    first = asyncio.create_task(next_chunk(reader))
    rid = (await fake.request()).rid
    await fake.send(protocol.encode(Kind.STDOUT, rid, b"x"))
    assert await first == b"x"
    await reader.aclose()  # type: ignore[attr-defined]
    cancel = await fake.request()
    assert (cancel.kind, cancel.rid, cancel.json()) == (Kind.EVENT, rid, {"event": "cancel"})


async def test_specs_go_out_as_one_request_each(pair: tuple[AgentClient, FakeAgent]) -> None:
    """An ExecSpec and a SpawnSpec become the exec and spawn requests of docs/protocol.md."""
    client, fake = pair
    spec = ExecSpec(
        ["cat"],
        env={"A": "1"},
        cwd="/tmp",
        timeout_s=5,
        stdin=b"hi",
        output_max_bytes=10,
        limits=ExecLimits(memory_mib=64),
    )
    pending = asyncio.create_task(client.exec(spec))
    request = await fake.request()
    assert request.json() == {
        "op": "exec",
        "argv": ["cat"],
        "shell": None,
        "env": {"A": "1"},
        "cwd": "/tmp",
        "timeout_s": 5,
        "output_max_bytes": 10,
        "limits": {"memory_mib": 64, "pids": None},
        "user": None,
        "stdin": base64.b64encode(b"hi").decode(),
    }
    await fake.answer(request.rid, {"ok": True, "exit_code": 0, "duration_ms": 1.0})
    assert (await pending).exit_code == 0
    started = asyncio.create_task(client.spawn(SpawnSpec("top", pty=(80, 24))))
    request = await fake.request()
    body = request.json()
    assert (body["op"], body["argv"], body["shell"]) == ("spawn", None, "top")
    assert body["pty"] == {"cols": 80, "rows": 24} and "stdin" not in body
    await fake.answer(request.rid, {"ok": True, "pid": 42})
    assert await started == 42


def test_a_spec_is_one_frozen_value() -> None:
    """A list argv is kept as a tuple (equal specs compare equal); replace() derives one."""
    spec = ExecSpec(["echo", "hi"], timeout_s=1)
    assert spec.cmd == ("echo", "hi") and spec == ExecSpec(("echo", "hi"), timeout_s=1)
    assert spec.command == ["echo", "hi"] and ExecSpec("echo hi").command == "echo hi"
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.timeout_s = 2  # type: ignore[misc]
    capped = dataclasses.replace(spec, timeout_s=0.5, env={"A": "1"})
    assert (capped.cmd, capped.timeout_s, capped.env, spec.env) == (spec.cmd, 0.5, {"A": "1"}, {})
