"""The ``connect`` op on the real agent, run on the host over its unix socket: the agent
connects to a server on this host's loopback, as it would to one in the guest."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from emberbox import errors
from emberbox.agent_client.client import AgentClient

pytestmark = pytest.mark.anyio


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echoes everything, then says how much it read once the client half-closed."""
    total = 0
    while data := await reader.read(65536):
        total += len(data)
        writer.write(data)
        await writer.drain()
    writer.write(f"<{total}>".encode())
    await writer.drain()
    writer.close()


async def test_bytes_go_both_ways_past_the_window(client: AgentClient) -> None:
    """12 MiB (three windows) echo through one tunnel while being read; the half-close
    reaches the server, whose last words and close come back."""
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    payload = os.urandom(12 << 20)
    async with server, client.connect(port) as tunnel:

        async def send() -> None:
            for i in range(0, len(payload), 1 << 20):
                await tunnel.send(payload[i : i + (1 << 20)])
            await tunnel.send_eof()

        sender = asyncio.create_task(send())
        received = bytearray()
        while data := await tunnel.receive():
            received += data
        await sender
    assert bytes(received) == payload + f"<{len(payload)}>".encode()


async def test_a_closed_port_is_port_unreachable(client: AgentClient) -> None:
    """Nothing listening: the first receive raises AgentRequestFailed, PortUnreachable."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listening: refused
        async with client.connect(port) as tunnel:
            with pytest.raises(errors.AgentRequestFailed) as failed:
                await tunnel.receive()
    assert failed.value.details["type"] == "PortUnreachable"
    assert "refused" in str(failed.value).lower()
    await client.ping()  # the channel is fine


async def test_leaving_early_closes_the_guest_connection(client: AgentClient) -> None:
    """Leaving the tunnel's block cancels the request: the server sees end of file."""
    closed = asyncio.Event()

    async def wait_for_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello")
        await reader.read()
        closed.set()
        writer.close()

    server = await asyncio.start_server(wait_for_eof, "127.0.0.1", 0)
    async with server:
        async with client.connect(server.sockets[0].getsockname()[1]) as tunnel:
            assert await tunnel.receive() == b"hello"
        await asyncio.wait_for(closed.wait(), 5)
