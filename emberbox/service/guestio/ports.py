"""Ports of running sandboxes (``manager.ports``): TCP connections to servers inside the
guest, carried over the agent's channel, and the public URLs some of them get.

The guest needs no network for this: the agent connects to ``127.0.0.1:port`` in the
guest and relays the bytes (the ``connect`` op, docs/protocol.md). Connections open at
once are capped per sandbox (``max_tunnels_per_sandbox``); the bytes in flight are
bounded by the protocol's window, so a slow client holds up only its own connection.

A port made public gets an unguessable token: whoever has the URL with it reaches the
port without an API key, until the token is revoked or the sandbox stops. Tokens live
in the server's memory: a restart revokes them all.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from emberbox import errors
from emberbox.config import Settings
from emberbox.service.guestio.common import GuestService, LiveSandboxes
from emberbox.service.sandboxes.state import SandboxState

if TYPE_CHECKING:
    from emberbox.agent_client.calls import ByteTunnel

TOKEN_BYTES = 24  # 192 bits: the URL is the only credential


@dataclass(frozen=True)
class PublicPort:
    sandbox_id: str
    port: int
    token: str


def checked_port(port: int) -> int:
    if not 1 <= port <= 65535:
        raise errors.InvalidRequest(f"port {port} is not a TCP port (1-65535)", field="port")
    return port


class SandboxPorts(GuestService):
    """Connections to the manager's running sandboxes' ports, and their public tokens."""

    def __init__(self, sandboxes: LiveSandboxes, settings: Settings) -> None:
        super().__init__(sandboxes, settings)
        self._open: dict[str, int] = {}
        self._public: dict[str, PublicPort] = {}  # token -> port

    @contextlib.asynccontextmanager
    async def tunnel(self, sandbox_id: str, port: int) -> AsyncIterator[ByteTunnel]:
        """A connection to ``127.0.0.1:port`` in the sandbox, closed on leaving.

        QuotaExceeded past ``max_tunnels_per_sandbox``; a port nothing listens on shows
        as AgentRequestFailed (``type`` "PortUnreachable") from the tunnel's receive.
        """
        checked_port(port)
        limit = self._settings.max_tunnels_per_sandbox
        if self._open.get(sandbox_id, 0) >= limit:
            raise errors.QuotaExceeded(
                f"sandbox {sandbox_id} has {limit} port connections open already",
                quota="max_tunnels_per_sandbox",
                limit=limit,
            )
        self._open[sandbox_id] = self._open.get(sandbox_id, 0) + 1
        try:
            async with self._guest(sandbox_id) as (_, agent), agent.connect(port) as tunnel:
                yield tunnel
        finally:
            self._open[sandbox_id] -= 1
            if not self._open[sandbox_id]:
                del self._open[sandbox_id]

    def open_count(self, sandbox_id: str) -> int:
        return self._open.get(sandbox_id, 0)

    async def publish(self, sandbox_id: str, port: int) -> PublicPort:
        """Make ``port`` reachable without a key; the same token while it stays public."""
        checked_port(port)
        record = await self._sandboxes.get(sandbox_id)
        if record.state is not SandboxState.RUNNING:
            raise errors.Conflict(f"sandbox {sandbox_id} is {record.state.value}")
        found = self.public(sandbox_id, port)
        if found is not None:
            return found
        public = PublicPort(sandbox_id, port, secrets.token_urlsafe(TOKEN_BYTES))
        self._public[public.token] = public
        return public

    def unpublish(self, sandbox_id: str, port: int) -> bool:
        """Revoke the port's public token; False when it had none."""
        found = self.public(sandbox_id, port)
        if found is not None:
            del self._public[found.token]
        return found is not None

    def public(self, sandbox_id: str, port: int) -> PublicPort | None:
        for public in self._public.values():
            if (public.sandbox_id, public.port) == (sandbox_id, port):
                return public
        return None

    async def redeem(self, token: str) -> PublicPort:
        """The port a public token opens; NotFound when revoked, unknown or stopped."""
        public = self._public.get(token)
        if public is not None:
            record = await self._sandboxes.get(public.sandbox_id)
            if record.state is SandboxState.RUNNING:
                return public
            del self._public[token]  # its sandbox is gone: so is the URL
        raise errors.NotFound("no such public port (revoked, or its sandbox stopped)")
