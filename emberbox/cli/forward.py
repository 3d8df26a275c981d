"""``emberbox port-forward ID [LOCAL:]REMOTE``: a local TCP port that leads to a port
inside a sandbox, as ``kubectl port-forward`` does.

Each connection to ``127.0.0.1:LOCAL`` opens a WebSocket to the server's raw TCP route
(``/v1/sandboxes/{id}/tcp/{REMOTE}``), which the agent relays to ``127.0.0.1:REMOTE`` in
the guest: any protocol goes, and the guest needs no network. Ctrl-C stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from typing import Annotated

import typer
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from emberbox.cli import ids
from emberbox.cli.common import ApiKey, Url, clean_errors, err_console
from emberbox.sdk import Sandbox
from emberbox.sdk._calls import ClientConfig
from emberbox.sdk._ports import auth_headers, tcp_url

READ_SIZE = 64 * 1024


def parse_ports(spec: str) -> tuple[int, int]:
    """``(local, remote)`` of ``REMOTE`` (the same port locally) or ``LOCAL:REMOTE``;
    LOCAL 0 picks a free port."""
    local_text, sep, remote_text = spec.rpartition(":")
    try:
        remote = int(remote_text)
        local = int(local_text) if sep else remote
    except ValueError:
        raise typer.BadParameter(f"expected [LOCAL:]REMOTE ports, got {spec!r}") from None
    if not 1 <= remote <= 65535 or not 0 <= local <= 65535:
        raise typer.BadParameter(f"ports must be 1-65535 (LOCAL may be 0), got {spec!r}")
    return local, remote


def port_forward(
    sandbox_id: Annotated[str, typer.Argument(help="Sandbox id (or a unique prefix)")],
    ports: Annotated[str, typer.Argument(metavar="[LOCAL:]REMOTE", help="e.g. 8000 or 9000:80")],
    address: Annotated[str, typer.Option(help="Local address to listen on")] = "127.0.0.1",
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Forward a local TCP port to a port inside the sandbox until Ctrl-C.

    Example: emberbox port-forward 3f2a9c1b 8000  (then open http://127.0.0.1:8000)
    """
    local, remote = parse_ports(ports)
    with clean_errors():
        sandbox = Sandbox(ids.sandbox_id(sandbox_id, url, api_key), url=url, api_key=api_key)
        try:
            sandbox.info()  # NotFound here rather than on the first connection
        finally:
            sandbox.close()
    config = ClientConfig.resolve(url, api_key)
    forwarder = Forwarder(tcp_url(config, sandbox.id, remote), auth_headers(config), remote)
    asyncio.run(forwarder.serve(address, local))
    err_console.print("stopped", markup=False)


class Forwarder:
    """Accepts local connections and relays each over its own WebSocket."""

    def __init__(self, ws_url: str, headers: dict[str, str], remote: int) -> None:
        self._ws_url, self._headers, self._remote = ws_url, headers, remote
        self._relays: set[asyncio.Task[object]] = set()

    async def serve(self, address: str, local: int) -> None:
        """Until SIGINT or SIGTERM: then the listener and every connection close."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        server = await asyncio.start_server(self._track, address, local)
        bound = server.sockets[0].getsockname()
        print(f"Forwarding from {bound[0]}:{bound[1]} -> {self._remote}", flush=True)
        async with server:
            await stop.wait()
        for task in self._relays:
            task.cancel()
        await asyncio.gather(*self._relays, return_exceptions=True)

    async def _track(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._relays.add(task)
        try:
            await self._relay(reader, writer)
        except asyncio.CancelledError:
            pass  # stopping: the connection is closed below all the same
        finally:
            self._relays.discard(task)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with connect(self._ws_url, additional_headers=self._headers, max_size=None) as ws:
                upload = asyncio.create_task(_upload(reader, ws))
                try:
                    await _download(ws, writer)
                finally:
                    upload.cancel()
                    await asyncio.gather(upload, return_exceptions=True)
        except InvalidStatus as exc:
            _warn(f"the server refused the tunnel: HTTP {exc.response.status_code}")
        except (OSError, ConnectionClosed) as exc:
            _warn(f"connection to port {self._remote} ended: {exc}")
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _upload(reader: asyncio.StreamReader, ws: ClientConnection) -> None:
    while data := await reader.read(READ_SIZE):
        await ws.send(data)
    await ws.send(b"")  # our client half-closed: so does the guest side


async def _download(ws: ClientConnection, writer: asyncio.StreamWriter) -> None:
    try:
        async for message in ws:
            writer.write(message if isinstance(message, bytes) else message.encode())
            await writer.drain()
    except ConnectionClosed:
        pass
    if ws.close_code not in (None, 1000):
        _warn(f"port: {ws.close_reason or ws.close_code}")


def _warn(message: str) -> None:
    print(f"emberbox: {message}", file=sys.stderr, flush=True)
