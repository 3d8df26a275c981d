"""``/v1/sandboxes/{id}/ports/{port}/...``: servers inside a sandbox, through the API.

- ``GET|POST|PUT|PATCH|DELETE|HEAD|OPTIONS /v1/sandboxes/{id}/ports/{port}/{path}`` is
  relayed to ``http://127.0.0.1:{port}/{path}`` inside the guest, bodies streaming both
  ways; a WebSocket handshake on the same path is relayed as a WebSocket.
- ``WS /v1/sandboxes/{id}/tcp/{port}`` carries raw TCP in binary messages (``emberbox
  port-forward``).
- ``POST /v1/sandboxes/{id}/ports/{port}`` ``{"public": true}`` gives the port an
  unguessable URL, ``/v1/ports/{token}/{path}``, that works without a key until
  ``{"public": false}`` revokes it or the sandbox stops.

The bytes travel over the agent's channel (the ``connect`` op), so the guest needs no
network. The API key is never passed on to the guest's server. See docs/ports.md.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, Depends, Path, Request, WebSocket
from starlette.requests import HTTPConnection
from starlette.responses import Response

from emberbox import errors
from emberbox.api import tunnels
from emberbox.api.deps import get_context, require_api_key
from emberbox.api.errors import error_responses
from emberbox.api.routes.sandboxes import SandboxId
from emberbox.api.streams import BINARY_SCHEMA
from emberbox.models import PortPublic, PortUpdate

if TYPE_CHECKING:
    from emberbox.service.guestio.ports import SandboxPorts

router = APIRouter(prefix="/v1/sandboxes/{sandbox_id}", tags=["ports"])
websocket_router = APIRouter(prefix="/v1/sandboxes/{sandbox_id}", tags=["ports"])
public_router = APIRouter(prefix="/v1/ports/{token}", tags=["ports"])  # no key: the token

Port = Annotated[int, Path(ge=1, le=65535, description="TCP port in the guest")]
Token = Annotated[str, Path(min_length=16, max_length=64, description="Public port token")]
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
# A raw body of any type, streamed: only the per-chunk deadline of BodyGuard applies.
STREAMED = {"requestBody": {"content": {"*/*": {"schema": {"type": "string"}}}}}
PUBLIC_PREFIX = "/v1/ports"
RELAYED: dict[int | str, dict[str, object]] = {
    200: {
        "description": "The guest server's answer (any status), as it sent it",
        "content": {"*/*": {"schema": BINARY_SCHEMA}},
    }
}


def get_ports(connection: HTTPConnection) -> SandboxPorts:
    return get_context(connection).manager.ports


PortsDep = Annotated["SandboxPorts", Depends(get_ports)]


def _public(ports: SandboxPorts, sandbox_id: str, port: int) -> PortPublic:
    found = ports.public(sandbox_id, port)
    url = f"{PUBLIC_PREFIX}/{found.token}/" if found is not None else None
    return PortPublic(
        port=port, public=found is not None, url=url, open_connections=ports.open_count(sandbox_id)
    )


@router.get("/ports/{port}", response_model=PortPublic, responses=error_responses(400, 404, 422))
async def get_port(sandbox_id: SandboxId, port: Port, ports: PortsDep) -> PortPublic:
    """Whether the port is public (and its URL)."""
    return _public(ports, sandbox_id, port)


@router.post(
    "/ports/{port}", response_model=PortPublic, responses=error_responses(400, 404, 409, 422)
)
async def update_port(
    sandbox_id: SandboxId, port: Port, body: PortUpdate, ports: PortsDep
) -> PortPublic:
    """Make the port public (an unguessable URL that needs no key) or revoke its URL."""
    if body.public:
        await ports.publish(sandbox_id, port)
    else:
        ports.unpublish(sandbox_id, port)
    return _public(ports, sandbox_id, port)


async def proxy(
    sandbox_id: SandboxId, port: Port, path: str, request: Request, ports: PortsDep
) -> Response:
    """Relay the request to `http://127.0.0.1:{port}/{path}` in the guest (502 when
    nothing answers there)."""
    prefix = f"/v1/sandboxes/{sandbox_id}/ports/{port}"
    return await _proxy(request, ports, sandbox_id, port, path, prefix, keep_auth=False)


async def public_proxy(token: Token, path: str, request: Request, ports: PortsDep) -> Response:
    """A public port: the same relay, the token standing in for the key."""
    public = await ports.redeem(token)
    prefix = f"{PUBLIC_PREFIX}/{token}"
    return await _proxy(
        request, ports, public.sandbox_id, public.port, path, prefix, keep_auth=True
    )


for _method in METHODS:  # one route per method: each its own OpenAPI operation
    router.add_api_route(
        "/ports/{port}/{path:path}",
        proxy,
        methods=[_method],
        name=f"proxy_{_method.lower()}",
        responses={**RELAYED, **error_responses(403, 404, 409, 422, 502)},
        openapi_extra=STREAMED,
    )
    public_router.add_api_route(
        "/{path:path}",
        public_proxy,
        methods=[_method],
        name=f"public_proxy_{_method.lower()}",
        responses={**RELAYED, **error_responses(404, 422, 502)},
        openapi_extra=STREAMED,
    )


async def _proxy(
    request: Request,
    ports: SandboxPorts,
    sandbox_id: str,
    port: int,
    path: str,
    prefix: str,
    *,
    keep_auth: bool,
) -> Response:
    stack = contextlib.AsyncExitStack()
    tunnel = await stack.enter_async_context(ports.tunnel(sandbox_id, port))
    return await tunnels.forward_http(
        request, tunnel, path, prefix, stack.aclose, keep_auth=keep_auth
    )


@websocket_router.websocket("/ports/{port}/{path:path}")
async def proxy_websocket(websocket: WebSocket, sandbox_id: str, port: int, path: str) -> None:
    """A WebSocket to `ws://127.0.0.1:{port}/{path}` in the guest."""
    await _websocket(websocket, sandbox_id, port, path, raw=False)


@websocket_router.websocket("/tcp/{port}")
async def raw_tcp(websocket: WebSocket, sandbox_id: str, port: int) -> None:
    """Raw TCP to `127.0.0.1:{port}` in binary messages; an empty one half-closes."""
    await _websocket(websocket, sandbox_id, port, "", raw=True)


@public_router.websocket("/{path:path}")
async def public_websocket(websocket: WebSocket, token: str, path: str) -> None:
    """A public port's WebSocket."""
    try:
        public = await get_ports(websocket).redeem(token)
    except errors.EmberboxError:
        await websocket.close(4404)
        return
    await _relay(websocket, public.sandbox_id, public.port, path, raw=False)


async def _websocket(
    websocket: WebSocket, sandbox_id: str, port: int, path: str, *, raw: bool
) -> None:
    try:
        require_api_key(websocket)
    except errors.EmberboxError as exc:
        with contextlib.suppress(RuntimeError):  # closed already
            await websocket.close(4000 + exc.status_code, exc.message[:120])
        return
    await _relay(websocket, sandbox_id, port, path, raw=raw)


async def _relay(websocket: WebSocket, sandbox_id: str, port: int, path: str, *, raw: bool) -> None:
    try:
        async with get_ports(websocket).tunnel(sandbox_id, port) as tunnel:
            if raw:
                await websocket.accept()
                await tunnels.relay_raw(websocket, tunnel)
            else:
                await tunnels.forward_websocket(websocket, tunnel, path)
    except errors.EmberboxError as exc:
        with contextlib.suppress(RuntimeError):  # closed already
            await websocket.close(4000 + exc.status_code, exc.message[:120])
