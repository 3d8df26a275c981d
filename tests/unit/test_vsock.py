"""The host side of Firecracker's vsock handshake: the pure parser and the connecting loop."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from emberbox.errors import BootTimeout, VMMCrashed
from emberbox.vmm.firecracker.vsock import (
    VsockAccepted,
    VsockHandshake,
    VsockRefused,
    connect_request,
    connect_vsock,
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def uds() -> Iterator[Path]:
    """A unix socket path short enough for sun_path."""
    tmp = Path(tempfile.mkdtemp(prefix="vs", dir="/tmp"))
    yield tmp / "v.sock"
    shutil.rmtree(tmp, ignore_errors=True)


def test_connect_request_is_one_line() -> None:
    """The request names the guest port in decimal and ends with a newline."""
    assert connect_request(1024) == b"CONNECT 1024\n"
    with pytest.raises(ValueError):
        connect_request(0)


def test_ok_line_in_one_piece() -> None:
    """A whole ``OK <port>`` line is accepted with the host port and nothing left over."""
    assert VsockHandshake().feed(b"OK 1073741824\n") == VsockAccepted(1073741824, b"")


def test_ok_line_split_across_reads() -> None:
    """The answer may arrive one byte at a time; nothing is decided before the newline."""
    handshake = VsockHandshake()
    for byte in b"OK 52":
        assert handshake.feed(bytes([byte])) is None
    assert handshake.feed(b"\n") == VsockAccepted(52, b"")


def test_bytes_after_ok_are_handed_on() -> None:
    """Agent bytes that arrive with the OK line are returned, not dropped."""
    handshake = VsockHandshake()
    assert handshake.feed(b"OK") is None
    assert handshake.feed(b" 7\nEB\x03rest") == VsockAccepted(7, b"EB\x03rest")


@pytest.mark.parametrize(
    "answer",
    [b"HTTP/1.1 400 Bad Request\r\n", b"NO\n", b"OK\n", b"OK abc\n", b"OK 1 2\n", b"OK 1" * 30],
)
def test_anything_but_ok_is_refused(answer: bytes) -> None:
    """Garbage, a bare OK, a non-numeric port or an endless line raise VsockRefused."""
    with pytest.raises(VsockRefused, match="unexpected answer"):
        VsockHandshake().feed(answer)


def test_close_before_ok_is_a_refusal() -> None:
    """A connection closed before the OK line means nothing listens on the guest port."""
    handshake = VsockHandshake()
    handshake.feed(b"OK 1")
    assert "agent not listening" in str(handshake.eof())


async def _fake_firecracker_vsock(uds: Path, refusals: int, answer: bytes) -> asyncio.Server:
    """A server that drops the first ``refusals`` connections, then answers ``answer``."""
    left = [refusals]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        if left[0] > 0 or line != b"CONNECT 1024\n":
            left[0] -= 1
        else:
            writer.write(answer)
            await writer.drain()
            while data := await reader.read(1024):
                writer.write(data)
                await writer.drain()
        writer.close()
        await writer.wait_closed()

    return await asyncio.start_unix_server(handle, path=str(uds))


@pytest.mark.anyio
async def test_connect_retries_until_the_agent_listens(uds: Path) -> None:
    """Dropped connections are retried; the stream starts with the bytes sent along with OK."""
    server = await _fake_firecracker_vsock(uds, refusals=3, answer=b"OK 99\nhello")
    async with server:
        reader, writer = await connect_vsock(uds, 1024, timeout_s=5)
        assert await reader.readexactly(5) == b"hello"
        writer.write(b"echo")
        assert await reader.readexactly(4) == b"echo"
        writer.close()
        await writer.wait_closed()


@pytest.mark.anyio
async def test_connect_times_out_with_the_console_tail(uds: Path) -> None:
    """A guest that never listens ends in BootTimeout carrying the reason and the console."""
    server = await _fake_firecracker_vsock(uds, refusals=10**6, answer=b"")
    async with server:
        with pytest.raises(BootTimeout, match="agent not listening") as caught:
            await connect_vsock(uds, 1024, timeout_s=0.3, console_tail=lambda: "kernel panic")
    assert caught.value.console_tail == "kernel panic"


@pytest.mark.anyio
async def test_garbage_answer_is_retried_then_reported(uds: Path) -> None:
    """Something that is not Firecracker on the socket is reported in the timeout message."""
    server = await _fake_firecracker_vsock(uds, refusals=0, answer=b"SSH-2.0-OpenSSH\r\n")
    async with server:
        with pytest.raises(BootTimeout, match="unexpected answer"):
            await connect_vsock(uds, 1024, timeout_s=0.3)


@pytest.mark.anyio
async def test_missing_socket_times_out(uds: Path) -> None:
    """No socket at all (Firecracker not configured yet) is retried, then BootTimeout."""
    with pytest.raises(BootTimeout):
        await connect_vsock(uds, 1024, timeout_s=0.1)


@pytest.mark.anyio
async def test_dead_vmm_stops_the_wait_at_once(uds: Path) -> None:
    """When the VMM process is gone the wait ends with VMMCrashed, not a timeout."""
    with pytest.raises(VMMCrashed):
        await connect_vsock(uds, 1024, timeout_s=30, is_running=lambda: False)
