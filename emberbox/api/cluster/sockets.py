"""Terminals and port sockets in cluster mode: WebSockets relayed to the owning host.

Terminal tickets (for browsers) are this replica's own: ``POST .../pty/ticket`` issues
one here and the socket that offers it must come to the same replica (tickets live in
its memory for ``pty_ticket_ttl_s``; behind a load balancer, route ``/pty`` sockets with
the ticket call, or use a key). Public port URLs (``/v1/ports/{token}``) are the hosts'
and are not served in cluster mode (docs/cluster.md).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, WebSocket
from starlette.responses import Response

from emberbox import errors
from emberbox.api import browsers
from emberbox.api.auth import PrincipalDep, TenancyDep
from emberbox.api.cluster.context import ClusterDep, get_cluster_context
from emberbox.api.cluster.relay import refuse, relay
from emberbox.api.cluster.sandboxes import SandboxId
from emberbox.api.cluster.system import not_served
from emberbox.api.deps import require_api_key
from emberbox.api.errors import error_responses
from emberbox.models import PortPublic, PortUpdate, PtyTicket

Port = Annotated[int, Path(ge=1, le=65535, description="TCP port in the guest")]
PUBLIC_PORTS = "public port URLs (the token is a host's); reach the port with an API key"

router = APIRouter(prefix="/v1/sandboxes", tags=["terminal"])  # behind authorize_websocket
ticket_router = APIRouter(prefix="/v1/sandboxes", tags=["terminal"])  # guarded as any call


@router.websocket("/{sandbox_id}/pty")
async def terminal(websocket: WebSocket, sandbox_id: str) -> None:
    """The sandbox's terminal on its host (query and frames as on a single server)."""
    await _relay(websocket, sandbox_id, terminal=True)


@router.websocket("/{sandbox_id}/ports/{port}/{path:path}")
async def port_websocket(websocket: WebSocket, sandbox_id: str) -> None:
    """A WebSocket to a server in the sandbox, through its host."""
    await _relay(websocket, sandbox_id, terminal=False)


@router.websocket("/{sandbox_id}/tcp/{port}")
async def raw_tcp(websocket: WebSocket, sandbox_id: str) -> None:
    """Raw TCP to a port in the sandbox, through its host."""
    await _relay(websocket, sandbox_id, terminal=False)


async def _relay(websocket: WebSocket, sandbox_id: str, *, terminal: bool) -> None:
    cluster = get_cluster_context(websocket)
    try:
        require_api_key(websocket)  # what authorize_websocket found at the handshake
        row = await cluster.index.sandbox(sandbox_id)
        endpoint = await cluster.endpoint(row.host)
    except errors.EmberboxError as exc:
        await refuse(websocket, exc, terminal=terminal)
        return
    await relay(websocket, endpoint.name, endpoint.url, endpoint.key, terminal=terminal)


@ticket_router.post(
    "/{sandbox_id}/pty/ticket",
    response_model=PtyTicket,
    responses=error_responses(404, 422),
)
async def terminal_ticket(
    sandbox_id: SandboxId, principal: PrincipalDep, tenancy: TenancyDep, cluster: ClusterDep
) -> PtyTicket:
    """A single-use ticket that opens this sandbox's terminal WebSocket as you, on this
    replica, within `expires_in_s` seconds."""
    await cluster.index.sandbox(sandbox_id)  # an unknown id is a 404 now
    ticket = tenancy.tickets.issue(principal, sandbox_id)
    return PtyTicket(
        ticket=ticket,
        expires_in_s=tenancy.tickets.ttl_s,
        protocols=[browsers.PTY_PROTOCOL, browsers.TICKET_PREFIX + ticket],
    )


@ticket_router.post(
    "/{sandbox_id}/ports/{port}",
    response_model=PortPublic,
    responses=error_responses(400, 404, 422, 503),
)
async def update_port(
    sandbox_id: SandboxId, port: Port, body: PortUpdate, request: Request, cluster: ClusterDep
) -> Response:
    """Revoke a port's public URL (`{"public": false}`); making one public is not served
    in cluster mode (501): its URL would name a host's token the replicas cannot route."""
    row = await cluster.index.sandbox(sandbox_id)  # an unknown id is a 404 first
    if body.public:
        return not_served(PUBLIC_PORTS)
    return await cluster.forward(request, row.host)
