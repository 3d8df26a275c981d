"""The real guest agent, run on the host over a unix socket, driven by the real client."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from emberbox import errors
from emberbox.agent_client.client import AgentClient, ExecLimits, ExecSpec, SpawnSpec
from emberbox.guest import protocol
from emberbox.images import initramfs
from emberbox.images.build import AGENT_INSTALL_DIR, agent_files
from emberbox.images.rootfs import guest_files
from tests.support.agent import RunningAgent, chunked, running_agent

pytestmark = pytest.mark.anyio


@pytest.fixture
def agent() -> Iterator[RunningAgent]:
    with running_agent() as started:
        yield started


def pgrep(pattern: str) -> bool:
    """Whether a process whose command line matches `pattern` is alive."""
    return subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode == 0


@pytest.fixture
async def client(agent: RunningAgent) -> AsyncIterator[AgentClient]:
    async with await agent.connect() as connected:
        yield connected


async def test_handshake(client: AgentClient) -> None:
    """The agent announces itself, answers hello and reports what it skipped as non-PID 1."""
    info = await client.handshake(timeout_s=10, hostname="box", sandbox_id="sb-1")
    assert client.ready.is_set()
    assert (info.protocol, info.agent_version) == (protocol.PROTOCOL_VERSION, "0.1.0")
    assert info.kernel == os.uname().release
    assert 0 < info.boot_time <= time.time()
    assert any("not PID 1" in w for w in info.warnings)
    assert len(info.warnings) == 4  # clock, entropy, hostname, sandbox id: none touched


async def test_hello_may_repeat(client: AgentClient) -> None:
    """A second hello (as after a snapshot restore) is answered like the first."""
    first = await client.handshake(timeout_s=10)
    second = await client.handshake(timeout_s=10, set_time=False)
    assert first.boot_time == pytest.approx(second.boot_time, abs=0.1)


async def test_exec_argv(client: AgentClient) -> None:
    """An argv runs without a shell: its arguments arrive verbatim."""
    result = await client.exec(ExecSpec(["printf", "%s|", "a b", "$HOME"]))
    assert (result.exit_code, result.stdout, result.stderr) == (0, b"a b|$HOME|", b"")
    assert result.signal is None and not result.timed_out and result.duration_ms > 0


async def test_exec_shell_separates_streams(client: AgentClient) -> None:
    """A shell string runs under /bin/sh; stdout, stderr and the exit code stay apart."""
    result = await client.exec(ExecSpec("echo out; echo err >&2; exit 3"))
    assert (result.exit_code, result.stdout, result.stderr) == (3, b"out\n", b"err\n")


async def test_exec_env_and_cwd(client: AgentClient, agent: RunningAgent) -> None:
    """The request's env is merged over the defaults, and cwd is honoured."""
    result = await client.exec(
        ExecSpec('echo "$FOO $HOME $LANG $PATH"; pwd', env={"FOO": "bar"}, cwd=agent.workdir)
    )
    path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert result.stdout.decode() == f"bar /root C.UTF-8 {path}\n{agent.workdir}\n"


async def test_exec_stdin(client: AgentClient) -> None:
    """Given stdin is fed whole then closed; without it the command reads /dev/null."""
    data = os.urandom(300_000)
    result = await client.exec(ExecSpec(["cat"], stdin=data))
    assert result.stdout == data
    assert (await client.exec(ExecSpec(["cat"], timeout_s=5))).stdout == b""


async def test_missing_program_is_127(client: AgentClient) -> None:
    """A program that does not exist gives 127 and a shell-like message, not an error."""
    result = await client.exec(ExecSpec(["/no/such/prog"]))
    assert result.exit_code == 127
    assert result.stderr == b"emberbox-agent: /no/such/prog: No such file or directory\n"


async def test_not_executable_is_126(client: AgentClient, agent: RunningAgent) -> None:
    """A program that exists but cannot be executed gives 126."""
    script = Path(agent.workdir, "script.sh")
    await asyncio.to_thread(script.write_text, "#!/bin/sh\necho hi\n")  # mode 644: no x bit
    result = await client.exec(ExecSpec([str(script)]))
    assert result.exit_code == 126 and b"Permission denied" in result.stderr


async def test_missing_cwd_is_invalid_request(client: AgentClient) -> None:
    """A cwd that does not exist is the caller's mistake: InvalidRequest naming it."""
    with pytest.raises(errors.InvalidRequest, match="/no/such/dir"):
        await client.exec(ExecSpec(["true"], cwd="/no/such/dir"))


async def test_killed_command_is_128_plus_signal(client: AgentClient) -> None:
    """A command killed by a signal reports 128+N and the signal, like a shell."""
    result = await client.exec(ExecSpec("kill -9 $$"))
    assert (result.exit_code, result.signal) == (137, 9)


async def test_timeout_kills_process_group(client: AgentClient) -> None:
    """On timeout the whole process group dies, background children included, promptly."""
    marker = f"100.{secrets.randbelow(10**6):06d}"  # a unique `sleep` argument to look for
    started = time.monotonic()
    result = await client.exec(ExecSpec(f"sleep {marker} & sleep {marker}", timeout_s=1))
    assert time.monotonic() - started < 4
    assert result.timed_out and (result.exit_code, result.signal) == (137, 9)
    deadline = time.monotonic() + 3
    while await asyncio.to_thread(pgrep, f"sleep {marker}"):
        assert time.monotonic() < deadline, "sleep children survived the timeout"
        await asyncio.sleep(0.05)


async def test_background_child_does_not_hold_exec_open(client: AgentClient) -> None:
    """When the main process exits, a background child keeping the pipes does not stall us."""
    started = time.monotonic()
    result = await client.exec(ExecSpec("sleep 30 & echo done"))
    assert result.exit_code == 0 and result.stdout == b"done\n"
    assert time.monotonic() - started < 5


async def test_output_cap(client: AgentClient) -> None:
    """Output past output_max_bytes is dropped and flagged; the command still completes."""
    result = await client.exec(
        ExecSpec("head -c 500000 /dev/zero; echo tail >&2", output_max_bytes=1000, timeout_s=10)
    )
    assert result.exit_code == 0 and result.output_truncated
    assert len(result.stdout) + len(result.stderr) == 1000


async def test_stalled_host_does_not_balloon_the_agent(agent: RunningAgent) -> None:
    """While the host does not read, the agent stops reading the command instead of buffering."""
    reader, writer = await asyncio.open_unix_connection(agent.socket_path)
    request = {"op": "exec", "shell": "head -c 100000000 /dev/zero"}
    writer.write(protocol.encode_json(protocol.Kind.REQUEST, 1, request))
    await asyncio.sleep(1.5)  # 100 MB would be produced in well under that
    status = await asyncio.to_thread(Path(f"/proc/{agent.proc.pid}/status").read_text)
    rss_kib = int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1])
    assert rss_kib < 60_000
    decoder, received, answer = protocol.FrameDecoder(), 0, None
    async with asyncio.timeout(60):
        while answer is None:
            for frame in decoder.feed(await reader.read(1 << 20)):
                if frame.kind is protocol.Kind.STDOUT:
                    received += len(frame.payload)  # acknowledged: exec output is windowed
                    ack = {"event": "ack", "bytes": received}
                    writer.write(protocol.encode_json(protocol.Kind.EVENT, 1, ack))
                elif frame.kind is protocol.Kind.RESPONSE:
                    answer = frame.json()
    writer.close()
    await writer.wait_closed()
    assert answer["exit_code"] == 0 and received == 100_000_000


async def test_concurrent_execs_not_mixed(client: AgentClient) -> None:
    """Ten commands at once each get exactly their own output."""

    async def one(i: int) -> None:
        result = await client.exec(
            ExecSpec(f"echo start-{i}; sleep 0.2; echo end-{i} >&2; exit {i}")
        )
        assert result.exit_code == i
        assert (result.stdout, result.stderr) == (f"start-{i}\n".encode(), f"end-{i}\n".encode())

    started = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(10)))
    assert time.monotonic() - started < 2  # they ran side by side, not one after another


async def test_output_streams_while_running(client: AgentClient) -> None:
    """The first line reaches on_stdout well before the command ends."""
    loop = asyncio.get_running_loop()
    arrivals: list[tuple[float, bytes]] = []
    result = await client.exec(
        ExecSpec("for i in 1 2 3 4 5; do echo line$i; sleep 0.3; done"),
        on_stdout=lambda chunk: arrivals.append((loop.time(), chunk)),
    )
    finished = loop.time()
    assert result.stdout == b"".join(chunk for _, chunk in arrivals)
    assert arrivals[0][1].startswith(b"line1")
    assert finished - arrivals[0][0] > 0.8


async def test_bad_requests_answered_not_fatal(client: AgentClient) -> None:
    """Unknown ops and malformed fields get InvalidRequest; the agent keeps serving."""
    with pytest.raises(errors.InvalidRequest, match="unknown op"):
        await client.request("frobnicate")
    with pytest.raises(errors.InvalidRequest, match="exactly one"):
        await client.request("exec", argv=["true"], shell="true")
    with pytest.raises(errors.InvalidRequest, match="timeout_s"):
        await client.request("exec", argv=["true"], timeout_s="soon")
    with pytest.raises(errors.InvalidRequest, match="base64"):
        await client.request("exec", argv=["cat"], stdin="***")
    await client.ping()


async def test_garbage_drops_only_that_connection(agent: RunningAgent) -> None:
    """Bytes that are not frames make the agent hang up, and it still serves new clients."""
    reader, writer = await asyncio.open_unix_connection(agent.socket_path)
    writer.write(b"GET / HTTP/1.1\r\n\r\n")
    async with asyncio.timeout(5):
        received = await reader.read()  # everything until the agent closes
    writer.close()
    await writer.wait_closed()
    ready = protocol.FrameDecoder().feed(received)
    assert [f.json()["event"] for f in ready] == ["ready"]
    async with await agent.connect() as fresh:
        assert (await fresh.exec(ExecSpec(["echo", "ok"]))).stdout == b"ok\n"


async def test_agent_death_disconnects_pending_exec(
    client: AgentClient, agent: RunningAgent
) -> None:
    """The agent going away mid-exec fails the pending exec with AgentDisconnected."""
    pids: list[bytes] = []
    running = asyncio.Event()

    def on_stdout(chunk: bytes) -> None:
        pids.append(chunk)
        running.set()

    pending = asyncio.create_task(
        client.exec(ExecSpec("echo $$; exec sleep 30"), on_stdout=on_stdout)
    )
    async with asyncio.timeout(5):
        await running.wait()
    agent.proc.kill()
    try:
        with pytest.raises(errors.AgentDisconnected):
            await pending
        assert client.closed
    finally:  # the killed agent could not clean up its command
        os.kill(int(pids[0]), signal.SIGKILL)


async def test_shutdown_stops_test_mode_agent(client: AgentClient, agent: RunningAgent) -> None:
    """Not being PID 1, the agent answers shutdown and then exits 0."""
    await client.shutdown()
    assert await asyncio.to_thread(agent.proc.wait, 5) == 0


async def test_limits_refused_when_not_pid_1(client: AgentClient) -> None:
    """Not PID 1, the agent leaves the host's cgroups alone: limits are refused, saying why."""
    with pytest.raises(errors.AgentRequestFailed, match="only as PID 1"):
        await client.exec(ExecSpec(["true"], limits=ExecLimits(memory_mib=64)))
    with pytest.raises(errors.InvalidRequest, match="memory_mib"):
        await client.request("exec", argv=["true"], limits={"memory_mib": 0})
    result = await client.exec(ExecSpec(["true"]))
    assert (result.memory_limited, result.peak_memory_kib) == (False, None)


async def test_cancelled_exec_kills_the_command(client: AgentClient) -> None:
    """A caller that gives up on an exec (task cancelled) makes the agent kill it."""
    marker = f"200.{secrets.randbelow(10**6):06d}"
    pending = asyncio.create_task(client.exec(ExecSpec(f"sleep {marker}")))
    deadline = time.monotonic() + 5
    while not await asyncio.to_thread(pgrep, f"sleep {marker}"):
        assert time.monotonic() < deadline, "the command never started"
        await asyncio.sleep(0.05)
    pending.cancel()
    deadline = time.monotonic() + 3
    while await asyncio.to_thread(pgrep, f"sleep {marker}"):
        assert time.monotonic() < deadline, "the abandoned command still runs"
        await asyncio.sleep(0.05)
    await client.ping()


GUEST_PYTHON = Path("/usr/bin/python3")  # Debian's, as in the guest image


@pytest.fixture
def installed(tmp_path: Path) -> list[str]:
    """The agent's package laid out as the image installs it (under tmp_path/root); the
    command that starts it as the initramfs does: PYTHONPATH=AGENT_DIR python3 -u -m."""
    if not GUEST_PYTHON.exists():
        pytest.skip("needs the system's /usr/bin/python3 (Debian's, as in the guest)")
    root = tmp_path / "root"
    for rel, data in guest_files(agent_files(), AGENT_INSTALL_DIR).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    python_path = f"PYTHONPATH={root}{initramfs.AGENT_DIR}"
    command = ["env", python_path, str(GUEST_PYTHON), "-s", "-u", "-m", initramfs.AGENT_PACKAGE]
    no_package = subprocess.run([*command[:4], "-c", "import emberbox"], cwd=tmp_path)
    assert no_package.returncode != 0  # so the agent may import only itself and the stdlib
    return command


async def test_agent_runs_as_installed_in_the_image(installed: list[str], tmp_path: Path) -> None:
    """The image's agent package runs as the guest starts it, without the emberbox package."""
    with running_agent(installed, cwd=tmp_path) as started:
        async with await started.connect() as client:
            info = await client.handshake(timeout_s=10)
            assert info.protocol == protocol.PROTOCOL_VERSION
            await client.write_file(str(tmp_path / "x.txt"), b"installed")
            archive = b"".join([chunk async for chunk in client.tar_out(str(tmp_path / "x.txt"))])
            assert await client.tar_in(str(tmp_path / "out"), chunked(archive, 1000)) == 1
            pid = await client.spawn(SpawnSpec(["cat", str(tmp_path / "out/x.txt")]))
            assert (await client.wait(pid, timeout_s=5)).exit_code == 0
