"""Background processes (spawn, attach, stdin, signals, PTY) on the real agent, on the host."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import subprocess
import time

import pytest

from emberbox import errors
from emberbox.agent_client.client import AgentClient, ExecSpec, ProcessStatus, SpawnSpec
from emberbox.guest import protocol
from emberbox.guest.processes import OutputRing
from tests.support.agent import RunningAgent, chunked, sha256

pytestmark = pytest.mark.anyio


class Output:
    """What attach delivered, in arrival order, with the time of the first chunk."""

    def __init__(self) -> None:
        self.chunks: list[tuple[str, bytes]] = []
        self.first_at: float | None = None
        self.grew = asyncio.Event()

    def stdout(self, data: bytes) -> None:
        self._add("out", data)

    def stderr(self, data: bytes) -> None:
        self._add("err", data)

    def text(self, stream: str = "out") -> str:
        return b"".join(d for s, d in self.chunks if s == stream).decode()

    async def wait_for(self, pattern: str, timeout_s: float = 5.0) -> re.Match[str]:
        async with asyncio.timeout(timeout_s):
            while (found := re.search(pattern, self.text())) is None:
                self.grew.clear()
                await self.grew.wait()
        return found

    def _add(self, stream: str, data: bytes) -> None:
        self.first_at = self.first_at or time.monotonic()
        self.chunks.append((stream, data))
        self.grew.set()


def attach(
    client: AgentClient, pid: int, output: Output, from_start: bool = True
) -> asyncio.Task[ProcessStatus]:
    return asyncio.create_task(
        client.attach(pid, from_start=from_start, on_stdout=output.stdout, on_stderr=output.stderr)
    )


def pgrep(pattern: str) -> bool:
    return subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode == 0


async def test_spawn_returns_at_once_and_attach_streams_in_order(client: AgentClient) -> None:
    """spawn answers before the process ends; attach delivers stdout and stderr in order, live."""
    started = time.monotonic()
    pid = await client.spawn(
        SpawnSpec("for i in 1 2 3; do echo out$i; echo err$i >&2; sleep 0.3; done")
    )
    assert time.monotonic() - started < 0.5
    output = Output()
    status = await attach(client, pid, output)
    ended = time.monotonic()
    lines = [(stream, data.decode()) for stream, data in output.chunks]
    expected = [(s, f"{s}{i}\n") for i in (1, 2, 3) for s in ("out", "err")]
    assert lines == expected
    assert output.first_at is not None and ended - output.first_at > 0.5  # live, not at the end
    assert (status.pid, status.running, status.exit_code, status.signal) == (pid, False, 0, None)
    assert status.duration_ms is not None and status.duration_ms > 800


@pytest.mark.parametrize("one_request", [True, False], ids=["spawn-attach", "in-steps"])
async def test_start_spawns_and_follows(client: AgentClient, one_request: bool) -> None:
    """start(): the pid before any output, then stdout and stderr in order and how it
    ended; with close_stdin a reader of stdin sees its end at once. One request to an
    agent with FEATURE_SPAWN_ATTACH, spawn/close/attach to one without (same results)."""
    if one_request:  # a client learns the agent's features from its hello
        await client.handshake(timeout_s=10)
        assert protocol.FEATURE_SPAWN_ATTACH in client.features
    else:
        assert protocol.FEATURE_SPAWN_ATTACH not in client.features
    output, pids = Output(), []

    async def started(pid: int) -> None:
        assert not output.chunks
        pids.append(pid)

    script = "echo out1; echo err1 >&2; cat; echo out2; exit 7"
    status = await asyncio.wait_for(
        client.start(
            SpawnSpec(script),
            started,
            close_stdin=True,
            on_stdout=output.stdout,
            on_stderr=output.stderr,
        ),
        10,
    )
    assert len(pids) == 1 and status.pid == pids[0]
    assert (status.running, status.exit_code) == (False, 7)
    assert [(s, d.decode()) for s, d in output.chunks] == [
        ("out", "out1\n"),
        ("err", "err1\n"),
        ("out", "out2\n"),
    ]
    listed = [p for p in await client.ps() if p.pid == pids[0]]
    assert len(listed) == 1 and listed[0].exit_code == 7


@pytest.mark.parametrize("one_request", [True, False], ids=["spawn-attach", "in-steps"])
async def test_start_of_a_process_that_ended_at_once(
    client: AgentClient, one_request: bool
) -> None:
    """close_stdin of a process that has already ended is no error (in steps the close
    comes after on_start, here after the process is gone)."""
    if one_request:
        await client.handshake(timeout_s=10)

    async def started(pid: int) -> None:
        assert not (await client.wait(pid, timeout_s=5)).running

    status = await asyncio.wait_for(client.start(SpawnSpec("true"), started, close_stdin=True), 10)
    assert (status.running, status.exit_code) == (False, 0)


async def test_start_keeps_stdin_open_unless_asked(client: AgentClient) -> None:
    """Without close_stdin the process reads what write_stdin sends while start follows it."""
    await client.handshake(timeout_s=10)
    pids: asyncio.Queue[int] = asyncio.Queue()
    output = Output()

    async def started(pid: int) -> None:
        await pids.put(pid)

    following = asyncio.create_task(
        client.start(SpawnSpec("cat"), started, on_stdout=output.stdout)
    )
    pid = await asyncio.wait_for(pids.get(), 5)
    await client.write_stdin(pid, b"fed\n", close=True)
    status = await asyncio.wait_for(following, 5)
    assert (status.exit_code, output.text()) == (0, "fed\n")


async def test_start_of_a_missing_program_fails_before_any_pid(client: AgentClient) -> None:
    """A command that cannot start is the spawn's error; on_start is never called."""
    await client.handshake(timeout_s=10)
    pids: list[int] = []

    async def started(pid: int) -> None:
        pids.append(pid)

    with pytest.raises(errors.NotFound):
        await client.start(SpawnSpec(["/no/such/program"]), started)
    assert pids == []


async def test_several_attaches_and_from_start(client: AgentClient) -> None:
    """Two attaches follow one process; without from_start only later output is seen."""
    pid = await client.spawn(SpawnSpec("echo early; read go; echo late"))
    everything, later = Output(), Output()
    first = attach(client, pid, everything)
    await everything.wait_for("early")
    second = attach(client, pid, later, from_start=False)
    await asyncio.sleep(0.2)  # let the second attach register before more output comes
    await client.write_stdin(pid, b"go\n", close=True)
    await asyncio.gather(first, second)
    assert everything.text() == "early\nlate\n"
    assert later.text() == "late\n"
    replay = Output()
    await attach(client, pid, replay)  # an ended process replays its buffer
    assert replay.text() == "early\nlate\n"


async def test_stdin_written_in_pieces_then_closed(client: AgentClient) -> None:
    """Bytes and async iterables reach stdin in order; close ends it; writing after is Conflict."""
    pid = await client.spawn(SpawnSpec(["cat"]))
    output = Output()
    follower = attach(client, pid, output)
    assert await client.write_stdin(pid, b"hello ") == 6
    assert await client.write_stdin(pid, chunked(b"from the host", 5)) == 13
    assert await client.write_stdin(pid, b"", close=True) == 0
    status = await follower
    assert output.text() == "hello from the host" and status.exit_code == 0
    with pytest.raises(errors.Conflict):
        await client.write_stdin(pid, b"more")


async def test_large_stdin_is_flow_controlled(client: AgentClient) -> None:
    """MiBs beyond the window reach a slow reader intact while other requests still answer."""
    data = os.urandom(3 * protocol.WINDOW + 12345)
    pid = await client.spawn(SpawnSpec("sleep 1; sha256sum"))
    writing = asyncio.create_task(client.write_stdin(pid, chunked(data, 100_000), close=True))
    await asyncio.sleep(0.3)
    assert not writing.done()  # the process does not read yet: the window is full
    started = time.monotonic()
    assert (await client.exec(ExecSpec(["echo", "still served"]))).stdout == b"still served\n"
    assert time.monotonic() - started < 1.0
    assert await writing == len(data)
    output = Output()
    await attach(client, pid, output)
    assert output.text().split()[0] == sha256(data)


async def test_signals(client: AgentClient) -> None:
    """TERM by name ends the process (143); the whole group dies; a second signal is Conflict."""
    marker = f"300.{secrets.randbelow(10**6):06d}"
    pid = await client.spawn(SpawnSpec(f"sleep {marker} & sleep {marker}; wait"))
    await asyncio.sleep(0.3)
    await client.signal(pid, "TERM")
    status = await client.wait(pid, timeout_s=5)
    assert (status.running, status.exit_code, status.signal) == (False, 143, 15)
    assert not await asyncio.to_thread(pgrep, f"sleep {marker}")
    with pytest.raises(errors.Conflict, match="already exited"):
        await client.signal(pid, "SIGKILL")


async def test_signal_by_number_and_unknown(client: AgentClient) -> None:
    """Numbers and SIG-prefixed names work; an unknown signal is InvalidRequest."""
    pid = await client.spawn(SpawnSpec(["sleep", "30"]))
    with pytest.raises(errors.InvalidRequest, match="unknown signal"):
        await client.signal(pid, "NOPE")
    await client.signal(pid, 9, group=False)
    assert (await client.wait(pid, timeout_s=5)).signal == 9


async def test_pty(client: AgentClient) -> None:
    """On a PTY: tty is /dev/pts/N, stty size follows spawn's size and resize, TERM is set."""
    script = "tty; stty size; read line; stty size; echo $TERM"
    pid = await client.spawn(SpawnSpec(["sh", "-c", script], pty=(100, 30)))
    output = Output()
    follower = attach(client, pid, output)
    await output.wait_for(r"30 100\r\n")
    await client.resize(pid, 120, 40)
    await client.write_stdin(pid, b"go\n")
    status = await follower
    assert status.exit_code == 0
    text = output.text()
    assert re.match(r"/dev/pts/\d+\r\n30 100\r\n", text)
    assert text.endswith("40 120\r\nxterm-256color\r\n")
    assert output.text("err") == ""  # a PTY has one stream
    assert [p.pty for p in await client.ps() if p.pid == pid] == [True]


async def test_pty_close_sends_end_of_file(client: AgentClient) -> None:
    """Closing a PTY process's stdin sends ^D: cat on the terminal sees end of file."""
    pid = await client.spawn(SpawnSpec(["cat"], pty=(80, 24)))
    await client.write_stdin(pid, b"line\n", close=True)
    status = await client.wait(pid, timeout_s=5)
    assert (status.running, status.exit_code) == (False, 0)


async def test_resize_without_pty_is_conflict(client: AgentClient) -> None:
    """resize on a process without a PTY is Conflict."""
    pid = await client.spawn(SpawnSpec(["sleep", "30"]))
    with pytest.raises(errors.Conflict, match="no PTY"):
        await client.resize(pid, 80, 24)
    await client.signal(pid, "KILL")


async def test_wait_ps_forget(client: AgentClient) -> None:
    """wait reports running or the end; ps lists both; forget drops ended ones only."""
    running = await client.spawn(SpawnSpec(["sleep", "30"]))
    ended = await client.spawn(SpawnSpec("exit 3"))
    status = await client.wait(ended, timeout_s=5)
    assert (status.running, status.exit_code, status.timed_out) == (False, 3, False)
    now = await client.wait(running)  # no timeout: no waiting
    assert now.running and now.exit_code is None and now.duration_ms is None
    listed = {p.pid: p for p in await client.ps()}
    assert listed[ended].cmd == "exit 3" and listed[ended].exit_code == 3
    assert listed[running].cmd == "sleep 30" and listed[running].running
    assert abs(listed[running].started_at - time.time()) < 10
    with pytest.raises(errors.Conflict, match="still running"):
        await client.forget(running)
    await client.forget(ended)
    assert ended not in {p.pid for p in await client.ps()}
    with pytest.raises(errors.NotFound):
        await client.forget(ended)
    await client.signal(running, "KILL")


async def test_output_ring_keeps_the_newest_bytes(client: AgentClient) -> None:
    """Past output_max_bytes the oldest output is dropped and output_truncated is set."""
    pid = await client.spawn(
        SpawnSpec("head -c 100000 /dev/zero | tr '\\0' a; echo END", output_max_bytes=1000)
    )
    status = await client.wait(pid, timeout_s=5)
    assert status.output_truncated and status.exit_code == 0
    output = Output()
    await attach(client, pid, output)
    assert output.text() == "a" * 996 + "END\n"


async def test_timeout_kills_the_process(client: AgentClient) -> None:
    """timeout_s kills the process group, as for exec."""
    pid = await client.spawn(SpawnSpec(["sleep", "30"], timeout_s=0.5))
    status = await client.wait(pid, timeout_s=5)
    assert (status.timed_out, status.exit_code, status.signal) == (True, 137, 9)


async def test_errors(client: AgentClient) -> None:
    """A missing program or pid is NotFound; a bad cwd or pty size is InvalidRequest."""
    with pytest.raises(errors.NotFound, match="/no/such/prog"):
        await client.spawn(SpawnSpec(["/no/such/prog"]))
    with pytest.raises(errors.InvalidRequest, match="cwd"):
        await client.spawn(SpawnSpec(["true"], cwd="/no/such/dir"))
    with pytest.raises(errors.InvalidRequest, match="at most"):
        await client.spawn(SpawnSpec(["true"], pty=(70000, 24)))
    for call in (client.wait(999_999_999), client.attach(999_999_999), client.signal(1 << 30, 9)):
        with pytest.raises(errors.NotFound, match="no process"):
            await call


async def test_processes_outlive_the_connection(agent: RunningAgent) -> None:
    """A process spawned on one connection is listed and attachable from the next."""
    async with await agent.connect() as first:
        pid = await first.spawn(SpawnSpec("echo hi; read line; echo bye"))
    async with await agent.connect() as second:
        assert pid in {p.pid for p in await second.ps()}
        await second.write_stdin(pid, b"\n", close=True)
        output = Output()
        await attach(second, pid, output)
        assert output.text() == "hi\nbye\n"


def test_output_ring_offsets() -> None:
    """The ring keeps the newest `cap` bytes; a reader resumes at its offset or the oldest kept."""
    ring = OutputRing(10)
    ring.append(protocol.Kind.STDOUT, b"abcdef")
    chunks, offset = ring.since(0)
    assert (chunks, offset) == ([(protocol.Kind.STDOUT, b"abcdef")], 6)
    ring.append(protocol.Kind.STDERR, b"ghijkl")  # 12 bytes: the oldest 2 go
    assert (ring.start, ring.end, ring.truncated) == (2, 12, True)
    assert ring.since(offset) == ([(protocol.Kind.STDERR, b"ghijkl")], 12)
    assert ring.since(0) == (
        [(protocol.Kind.STDOUT, b"cdef"), (protocol.Kind.STDERR, b"ghijkl")],
        12,
    )
    ring.append(protocol.Kind.STDOUT, b"0123456789XY")  # longer than the ring
    assert ring.since(0) == ([(protocol.Kind.STDOUT, b"23456789XY")], 24)
    assert OutputRing(0).since(0) == ([], 0)
