"""Tenancy as router-level dependencies: who calls, may they touch this id, and the audit.

``app.py`` puts :func:`authenticate`, :func:`audited` and :func:`require_owner` on every
guarded router, so a new route with a ``{sandbox_id}`` or ``{snapshot_id}`` is checked
without code of its own. Another tenant's id answers exactly as an unknown id (404, same
message); ids in bodies and queries are checked by the routes that take them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request
from starlette.requests import HTTPConnection

from emberbox import errors
from emberbox.api import browsers
from emberbox.api.deps import get_context
from emberbox.logs import request_context
from emberbox.service.tenancy.access import (
    LOCAL_TENANT_ID,
    AuditEntry,
    Kind,
    Principal,
    Tenancy,
)

if TYPE_CHECKING:
    from starlette.datastructures import Headers

OWNED_PARAMS: tuple[tuple[str, Kind], ...] = (
    ("sandbox_id", "sandbox"),
    ("snapshot_id", "snapshot"),
)
ARGV_MAX_CHARS = 1024  # an audited command is cut to this many characters

# (method, route path) -> audited action. Reads and listings are not audited.
ACTIONS: dict[tuple[str, str], str] = {
    ("POST", "/v1/sandboxes"): "sandbox.create",
    ("DELETE", "/v1/sandboxes/{sandbox_id}"): "sandbox.kill",
    ("POST", "/v1/sandboxes/{sandbox_id}/timeout"): "sandbox.timeout",
    ("POST", "/v1/sandboxes/{sandbox_id}/pause"): "sandbox.pause",
    ("POST", "/v1/sandboxes/{sandbox_id}/resume"): "sandbox.resume",
    ("POST", "/v1/sandboxes/{sandbox_id}/exec"): "sandbox.exec",
    ("POST", "/v1/sandboxes/{sandbox_id}/snapshots"): "snapshot.create",
    ("DELETE", "/v1/snapshots/{snapshot_id}"): "snapshot.delete",
    ("POST", "/v1/sandboxes/{sandbox_id}/processes"): "process.start",
    ("POST", "/v1/sandboxes/{sandbox_id}/processes/{pid}/signal"): "process.signal",
    ("PUT", "/v1/sandboxes/{sandbox_id}/files"): "file.write",
    ("DELETE", "/v1/sandboxes/{sandbox_id}/files"): "file.remove",
    ("POST", "/v1/sandboxes/{sandbox_id}/files/mkdir"): "file.mkdir",
    ("PUT", "/v1/sandboxes/{sandbox_id}/archive"): "file.upload",
    ("POST", "/v1/sandboxes/{sandbox_id}/ports/{port}"): "port.update",
    ("POST", "/vm/create"): "sandbox.create",
    ("POST", "/exec/command"): "sandbox.exec",
    ("POST", "/v1/run"): "run",
    ("POST", "/v1/images"): "image.build",
    ("POST", "/v1/images/import"): "image.import",
    ("DELETE", "/v1/images/{name}"): "image.delete",
}
# Body fields worth keeping, for the actions whose body is JSON (never file contents).
BODY_FIELDS: dict[str, tuple[str, ...]] = {
    "sandbox.create": ("image", "vcpus", "memory_mib", "snapshot_id", "name"),
    "image.import": ("ref", "name"),
    "sandbox.exec": ("cmd", "command", "cwd"),
    "port.update": ("public",),
    "process.start": ("cmd", "cwd", "pty"),
    "process.signal": ("signal",),
    "file.mkdir": ("path",),
    "run": ("language",),
}


def get_tenancy(connection: HTTPConnection) -> Tenancy:
    return get_context(connection).tenancy


def presented_key(headers: Headers) -> str | None:
    """The key of ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``; None if neither."""
    authorization = headers.get("authorization")
    if authorization is not None:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise errors.Unauthorized("malformed Authorization header: send Bearer <key>")
        return value.strip()
    return headers.get("x-api-key", "").strip() or None


async def authenticate(connection: HTTPConnection) -> Principal:
    """The caller; 401 without a valid key (outside local mode), 429 over its rate."""
    known = getattr(connection.state, "principal", None)
    if isinstance(known, Principal):
        return known
    client = connection.client.host if connection.client is not None else ""
    server = connection.scope.get("server")
    tenancy = get_tenancy(connection)
    principal = await tenancy.authenticate(
        presented_key(connection.headers),
        client,
        server=str(server[0]) if server else "",
        host_header=connection.headers.get("host"),
    )
    connection.state.principal = principal
    ctx = request_context.get()
    if ctx is not None:
        ctx.tenant = principal.tenant_id
    return principal


PrincipalDep = Annotated[Principal, Depends(authenticate)]
TenancyDep = Annotated[Tenancy, Depends(get_tenancy)]


async def require_owner(connection: HTTPConnection, principal: PrincipalDep) -> None:
    """404 (as for an unknown id) for a ``{sandbox_id}`` / ``{snapshot_id}`` in the path
    that belongs to another tenant."""
    tenancy = get_tenancy(connection)
    for param, kind in OWNED_PARAMS:
        value = connection.path_params.get(param)
        if value is not None:
            await tenancy.check_owner(principal, kind, str(value))
    ctx = request_context.get()
    sandbox_id = connection.path_params.get("sandbox_id")
    if ctx is not None and sandbox_id is not None:
        ctx.sandbox_id = str(sandbox_id)


async def authorize_websocket(connection: HTTPConnection) -> AsyncIterator[None]:
    """For WebSocket routes, which answer errors in frames after the handshake: the
    outcome of :func:`authenticate` and :func:`require_owner` is kept for
    ``deps.require_api_key`` to raise once the socket is accepted. A browser's ``Origin``
    is checked first, and its terminal ticket stands in for a key (:mod:`.browsers`).
    A tenant holds at most ``tenant_max_websockets`` open sockets (403 in a frame)."""
    outcome = "ok"
    try:
        _redeem_browser_ticket(connection)
        await require_owner(connection, await authenticate(connection))
    except errors.EmberboxError as exc:
        connection.state.auth_error = exc
        outcome = type(exc).__name__
    principal = getattr(connection.state, "principal", None)
    if isinstance(principal, Principal):
        port = connection.path_params.get("port")  # a sandbox port's socket (routes/ports)
        action, detail = (
            ("port.connect", {"port": port})
            if port is not None
            else ("terminal.open", {"cmd": _cut(connection.query_params.get("cmd"))})
        )
        entry = AuditEntry(
            principal.tenant_id,
            action,
            outcome,
            key_id=principal.key_id,
            target_id=connection.path_params.get("sandbox_id"),
            detail=detail,
        )
        await get_tenancy(connection).audit(entry)
    if outcome != "ok" or not isinstance(principal, Principal):
        yield
        return
    # Held while the socket is open: at most tenant_max_websockets per tenant.
    try:
        slot = get_tenancy(connection).sockets.hold(principal.tenant_id)
    except errors.QuotaExceeded as exc:
        connection.state.auth_error = exc
        yield
        return
    with slot:
        yield


def _redeem_browser_ticket(connection: HTTPConnection) -> None:
    """Unauthorized for a page of another origin; a ticket among the subprotocols makes
    its issuer the caller (used up even when the rest fails). A key and a ticket together
    are refused: the connection would have two callers."""
    context = get_context(connection)
    headers = connection.headers
    allowed = context.settings.websocket_allowed_origins
    browsers.check_origin(headers.get("origin"), headers.get("host"), allowed)
    ticket = browsers.offered_ticket(connection.scope.get("subprotocols", ()))
    if ticket is None:
        return
    sandbox_id = str(connection.path_params.get("sandbox_id", ""))
    principal = context.tenancy.tickets.redeem(ticket, sandbox_id)
    if presented_key(headers) is not None:
        raise errors.Unauthorized("send an API key or a terminal ticket, not both")
    connection.state.principal = principal


async def audited(request: Request, principal: PrincipalDep) -> AsyncIterator[None]:
    """Record the call in the audit log when its route is an action, with its outcome
    (``ok`` or the error's type). Installed with ``scope="function"``: the entry is
    written before the response goes out."""
    route = request.scope.get("route")
    action = ACTIONS.get((request.method, str(getattr(route, "path", ""))))
    if action is None:
        yield
        return
    detail = await _detail(request, action)
    try:
        yield
    except Exception as exc:
        await _record(request, principal, action, detail, type(exc).__name__)
        raise
    await _record(request, principal, action, detail, "ok")


async def _record(
    request: Request, principal: Principal, action: str, detail: dict[str, Any], outcome: str
) -> None:
    target = getattr(request.state, "audit_target", None) or _path_target(request)
    entry = AuditEntry(
        principal.tenant_id,
        action,
        outcome,
        key_id=principal.key_id,
        target_id=target,
        detail=detail,
    )
    await get_tenancy(request).audit(entry)


def owner_kwargs(principal: Principal) -> dict[str, Any]:
    """``tenant_id=`` for a create by ``principal`` (nothing for the built-in tenant)."""
    return {} if principal.tenant_id == LOCAL_TENANT_ID else {"tenant_id": principal.tenant_id}


def scope_kwargs(principal: Principal) -> dict[str, Any]:
    """``tenant_id=`` for a listing by ``principal`` (nothing for an admin: all)."""
    return {} if principal.admin else {"tenant_id": principal.tenant_id}


def _path_target(request: Request) -> str | None:
    for param, _ in OWNED_PARAMS:
        if param in request.path_params:
            return str(request.path_params[param])
    body_id = getattr(request.state, "audit_body_id", None)
    return str(body_id) if body_id else None


async def _detail(request: Request, action: str) -> dict[str, Any]:
    detail: dict[str, Any] = {}
    if "pid" in request.path_params:
        detail["pid"] = request.path_params["pid"]
    if "path" in request.query_params:
        detail["path"] = _cut(request.query_params["path"])
    fields = BODY_FIELDS.get(action)
    if fields is None:  # no JSON body (uploads stream): the size, never the content
        size = request.headers.get("content-length")
        if size is not None and size.isdigit():
            detail["bytes"] = int(size)
        return detail
    try:
        body = json.loads(await request.body() or b"{}")  # read (and kept) by FastAPI
    except ValueError:
        return detail
    if isinstance(body, dict):
        detail.update({name: _cut(body[name]) for name in fields if name in body})
        if isinstance(body.get("vm_id"), str):
            request.state.audit_body_id = body["vm_id"]
    return detail


def _cut(value: Any) -> Any:
    """Commands and paths cut to ARGV_MAX_CHARS (an argv by its total length)."""
    if isinstance(value, str):
        return value[:ARGV_MAX_CHARS]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        kept, total = [], 0
        for item in value:
            if total >= ARGV_MAX_CHARS:
                kept.append("...")
                break
            kept.append(item[: ARGV_MAX_CHARS - total])
            total += len(item)
        return kept
    return value
