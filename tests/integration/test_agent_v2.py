"""Protocol v2 in a real guest: cgroup limits, PTYs under the PID 1 agent, big files."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from emberbox.agent_client.client import AgentClient, ExecLimits, ExecSpec, SpawnSpec
from emberbox.service.vm.machine import SandboxVM

pytestmark = [pytest.mark.vm, pytest.mark.anyio]
Factory = Callable[..., Awaitable[SandboxVM]]
MIB = 1 << 20


async def test_exec_memory_limit(sandbox_factory: Factory) -> None:
    """A command past limits.memory_mib is OOM-killed and says so; one within it runs."""
    sb = await sandbox_factory()
    agent: AgentClient = sb.agent
    limits = ExecLimits(memory_mib=64)
    hog = await agent.exec(
        ExecSpec(["python3", "-c", "b = bytearray(200*1024*1024)"], limits=limits, timeout_s=60)
    )
    assert hog.memory_limited and (hog.exit_code, hog.signal) == (137, 9)
    assert hog.peak_memory_kib is not None and 32 * 1024 < hog.peak_memory_kib <= 64 * 1024
    fits = await agent.exec(
        ExecSpec(["python3", "-c", "b = bytearray(20*1024*1024)"], limits=limits, timeout_s=60)
    )
    assert (fits.exit_code, fits.memory_limited) == (0, False)
    assert fits.peak_memory_kib is not None and 20 * 1024 < fits.peak_memory_kib < 64 * 1024
    unlimited = await agent.exec(
        ExecSpec(["python3", "-c", "b = bytearray(200*1024*1024)"], timeout_s=60)
    )
    assert (unlimited.exit_code, unlimited.peak_memory_kib) == (0, None)
    left = await agent.exec(
        ExecSpec(["find", "/sys/fs/cgroup/emberbox", "-mindepth", "1", "-type", "d"])
    )
    assert left.stdout == b""  # each command's group is removed when it ends


async def test_exec_pids_limit(sandbox_factory: Factory) -> None:
    """limits.pids caps the processes a command may have at once."""
    sb = await sandbox_factory()
    result = await sb.agent.exec(
        ExecSpec(
            "for i in 1 2 3 4 5 6 7 8; do sleep 2 & done; wait",
            limits=ExecLimits(pids=4),
            timeout_s=30,
        )
    )
    assert b"fork" in result.stderr or b"Resource temporarily unavailable" in result.stderr


async def test_pty_process_under_the_pid_1_agent(sandbox_factory: Factory) -> None:
    """A spawned PTY process is the PID 1 agent's child on /dev/pts/N; resize reaches it."""
    sb = await sandbox_factory()
    agent: AgentClient = sb.agent
    pid = await agent.spawn(
        SpawnSpec(["sh", "-c", "tty; stty size; read line; stty size"], pty=(90, 20))
    )
    stat = await agent.exec(ExecSpec(["cat", f"/proc/{pid}/stat"]))
    assert stat.stdout.decode().rsplit(")", 1)[1].split()[1] == "1"  # its parent is PID 1
    output = bytearray()
    seen = asyncio.Event()

    def on_stdout(chunk: bytes) -> None:
        output.extend(chunk)
        seen.set()

    follower = asyncio.create_task(agent.attach(pid, on_stdout=on_stdout))
    async with asyncio.timeout(20):
        while b"20 90\r\n" not in output:
            seen.clear()
            await seen.wait()
    await agent.resize(pid, 132, 43)
    assert await agent.write_stdin(pid, b"go\n") == 3
    status = await follower
    assert status.exit_code == 0
    assert re.fullmatch(rb"/dev/pts/\d+\r\n20 90\r\ngo\r\n43 132\r\n", bytes(output))
    assert [p.pty for p in await agent.ps() if p.pid == pid] == [True]


async def test_64_mib_file_round_trip(sandbox_factory: Factory) -> None:
    """64 MiB go into the guest and come back identical, streamed in chunks."""
    sb = await sandbox_factory()
    agent: AgentClient = sb.agent
    data = os.urandom(64 * MIB)
    digest = hashlib.sha256(data).hexdigest()

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(data), MIB):
            yield data[i : i + MIB]

    started = time.monotonic()
    assert await agent.write_file("/var/tmp/big.bin", chunks()) == len(data)
    uploaded = time.monotonic()
    guest_sum = await agent.exec(ExecSpec(["sha256sum", "/var/tmp/big.bin"], timeout_s=60))
    assert guest_sum.stdout.split()[0].decode() == digest
    reading = time.monotonic()
    back, largest = hashlib.sha256(), 0
    async for chunk in agent.read_file("/var/tmp/big.bin"):
        back.update(chunk)
        largest = max(largest, len(chunk))
    downloaded = time.monotonic()
    assert back.hexdigest() == digest and largest <= 64 * 1024
    print(
        f"64 MiB through the {sb.vm.__class__.__name__}: "
        f"write {64 / (uploaded - started):.0f} MiB/s, read {64 / (downloaded - reading):.0f} MiB/s"
    )
