"""E2B's control plane (``E2B_API_URL``): create, get, list, kill, set_timeout, pause,
connect — with E2B's field names, status codes and ``{"code", "message"}`` errors
(PROTOCOL.md section 1). Every call goes through the service as the native API's do:
tenancy (keys, quotas, rate limits, audit) and every create rule hold unchanged.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from emberbox import errors
from emberbox.e2b import query
from emberbox.e2b.front import (
    ENVD_VERSION,
    Front,
    api_error,
    audit,
    authenticate,
    control_error,
    get_front,
)
from emberbox.e2b.query import E2bData
from emberbox.service.sandboxes.manager import SandboxRecord
from emberbox.service.sandboxes.state import SandboxState
from emberbox.service.tenancy.access import Principal

router = APIRouter(include_in_schema=False)

DEFAULT_TIMEOUT_S = 300
# E2B template names that are emberbox images by another name ("" = the default image).
TEMPLATES = {"base": "", "code-interpreter-v1": "", "code-interpreter": ""}
UNSUPPORTED = "is not supported by emberbox (see docs/e2b.md)"
E2B_STATES = {SandboxState.RUNNING: "running", SandboxState.PAUSED: "paused"}


def sandbox_body(front: Front, record: SandboxRecord, data: E2bData) -> dict[str, Any]:
    """E2B's ``S``: what create and connect answer."""
    del front
    return {
        "sandboxID": record.id,
        "templateID": data.template_id,
        "clientID": data.client_id,
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": data.token,
        "alias": data.template_id,
    }


def info_body(front: Front, record: SandboxRecord, data: E2bData) -> dict[str, Any]:
    """E2B's ``I``: ``S`` with times, state, shape and the caller's metadata."""
    return {
        **sandbox_body(front, record, data),
        "startedAt": query.rfc3339(record.created_at),
        "endAt": query.rfc3339(record.expires_at),
        "state": E2B_STATES.get(record.state, "running"),
        "cpuCount": record.vcpus,
        "memoryMB": record.memory_mib,
        "diskSizeMB": 0,
        "metadata": query.public_metadata(record.metadata),
    }


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        value = await request.json()
    except ValueError:
        raise errors.InvalidRequest("the body must be JSON") from None
    if not isinstance(value, dict):
        raise errors.InvalidRequest("the body must be a JSON object")
    return value


async def _owned(front: Front, principal: Principal, sandbox_id: str) -> SandboxRecord:
    """The caller's E2B-visible sandbox (running or paused), else NotFound."""
    await front.tenancy.check_owner(principal, "sandbox", sandbox_id)
    record = await front.manager.get(sandbox_id)
    if record.state not in E2B_STATES or E2bData.decode(record.metadata) is None:
        raise errors.NotFound(f"sandbox {sandbox_id} not found")
    return record


def _data(record: SandboxRecord) -> E2bData:
    data = E2bData.decode(record.metadata)
    assert data is not None  # _owned checked it
    return data


def _timeout(body: dict[str, Any], default: int | None) -> int | None:
    value = body.get("timeout", default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise errors.InvalidRequest(f"timeout must be a whole number of seconds (got {value!r})")
    return max(value, 1)


def _network(front: Front, body: dict[str, Any]) -> dict[str, object] | None:
    """E2B's ``allow_internet_access`` as emberbox egress; absent means the operator's
    choice (``e2b_internet_by_default``, off: emberbox's default deny)."""
    allow = body.get("allow_internet_access", body.get("allowInternetAccess"))
    if allow is None:
        allow = front.settings.e2b_internet_by_default
    if body.get("network"):
        raise errors.InvalidRequest(f"network rules {UNSUPPORTED}; use allow_internet_access")
    return {"egress": "full"} if allow is True else None


async def _create(request: Request) -> Response:
    front = get_front(request)
    try:
        principal = await authenticate(request)
    except errors.EmberboxError as exc:
        return control_error(exc)
    outcome, target = "ok", None
    try:
        body = await _body(request)
        template = body.get("templateID") or "base"
        if not isinstance(template, str):
            raise errors.InvalidRequest("templateID must be a string")
        metadata = body.get("metadata") or {}
        env = body.get("envVars") or {}
        if not isinstance(metadata, dict) or not isinstance(env, dict):
            raise errors.InvalidRequest("metadata and envVars must be objects")
        if any(str(k).startswith(query.RESERVED_PREFIX) for k in metadata):
            raise errors.InvalidRequest(
                f"metadata keys starting {query.RESERVED_PREFIX!r} are reserved"
            )
        for unsupported in ("volumeMounts", "mcp", "iam"):
            if body.get(unsupported):
                raise errors.InvalidRequest(f"{unsupported} {UNSUPPORTED}")
        data = E2bData(
            secrets.token_hex(32),
            secrets.token_hex(8),
            template,
            principal.tenant_id,
            principal.key_id,
        )
        record = await front.manager.create(
            image=TEMPLATES.get(template, template) or None,
            timeout_s=_timeout(body, DEFAULT_TIMEOUT_S),
            metadata={**metadata, query.RESERVED_KEY: data.encode()},
            env=env,
            network=_network(front, body),
            tenant_id=principal.tenant_id,
        )
        target = record.id
        return JSONResponse(sandbox_body(front, record, data), 201)
    except errors.ImageNotFound as exc:  # E2B's own answer for a template nobody has
        outcome = type(exc).__name__
        return api_error(404, f"template '{exc.name}' not found")
    except errors.EmberboxError as exc:
        outcome = type(exc).__name__
        return control_error(exc)
    finally:
        await audit(front, principal, "e2b.sandbox.create", target, outcome)


@router.post("/v2/sandboxes")
async def create_v2(request: Request) -> Response:
    return await _create(request)


@router.post("/sandboxes")
async def create_v1(request: Request) -> Response:
    return await _create(request)


@router.get("/sandboxes/{sandbox_id}")
async def get_info(request: Request, sandbox_id: str) -> Response:
    front = get_front(request)
    try:
        principal = await authenticate(request)
        record = await _owned(front, principal, sandbox_id)
        return JSONResponse(info_body(front, record, _data(record)))
    except errors.EmberboxError as exc:
        return control_error(exc)


async def _list(request: Request, *, v2: bool) -> Response:
    front = get_front(request)
    try:
        principal = await authenticate(request)
        params = request.query_params
        states = query.parse_states(params.get("state") if v2 else "running")
        wanted = query.decode_metadata_filter(params.get("metadata") or "")
        after = params.get("startedAfter")
        started_after = query.parse_time(after) if after else None
        template = params.get("template")
        limit = query.parse_limit(params.get("limit"))
        tenant = None if principal.admin else principal.tenant_id
        records = await front.manager.list(metadata=wanted or None, tenant_id=tenant)
        chosen = [
            r for r in records
            if E2B_STATES.get(r.state) in states
            and (data := E2bData.decode(r.metadata)) is not None
            and (template is None or data.template_id == template)
            and (started_after is None or r.created_at >= started_after)
        ]  # fmt: skip
        chosen.sort(key=lambda r: (r.created_at, r.id), reverse=params.get("order") != "asc")
        shown, token = query.page(chosen, params.get("nextToken"), limit)
    except query.QueryError as exc:
        return api_error(400, str(exc))
    except errors.EmberboxError as exc:
        return control_error(exc)
    headers = {"x-next-token": token} if token else None
    body = [info_body(front, r, _data(r)) for r in shown]
    return JSONResponse(body, headers=headers)


@router.get("/v2/sandboxes")
async def list_v2(request: Request) -> Response:
    return await _list(request, v2=True)


@router.get("/sandboxes")
async def list_v1(request: Request) -> Response:
    return await _list(request, v2=False)


async def _act(request: Request, sandbox_id: str, action: str) -> Response:
    front = get_front(request)
    try:
        principal = await authenticate(request)
    except errors.EmberboxError as exc:
        return control_error(exc)
    outcome = "ok"
    try:
        record = await _owned(front, principal, sandbox_id)
        return await _ACTIONS[action](front, request, record)
    except errors.EmberboxError as exc:
        outcome = type(exc).__name__
        return control_error(exc)
    finally:
        await audit(front, principal, f"e2b.sandbox.{action}", sandbox_id, outcome)


async def _kill(front: Front, request: Request, record: SandboxRecord) -> Response:
    del request
    await front.manager.kill(record.id)
    for table in (front.processes, front.watchers):
        for key in [k for k in table if k[0] == record.id]:
            table.pop(key, None)  # type: ignore[arg-type]
    return Response(status_code=204)


async def _set_timeout(front: Front, request: Request, record: SandboxRecord) -> Response:
    timeout = _timeout(await _body(request), None)
    if timeout is None:
        raise errors.InvalidRequest("timeout is required")
    await front.manager.set_timeout(record.id, timeout)
    return Response(status_code=204)


async def _pause(front: Front, request: Request, record: SandboxRecord) -> Response:
    del request
    if record.state is SandboxState.PAUSED:
        return api_error(409, f"sandbox {record.id} is already paused")
    await front.manager.pause(record.id)
    return Response(status_code=204)


async def _connect(front: Front, request: Request, record: SandboxRecord) -> Response:
    timeout = _timeout(await _body(request), None)
    status = 200
    if record.state is SandboxState.PAUSED:
        await front.manager.resume(record.id)
        record = await front.manager.set_timeout(record.id, timeout or DEFAULT_TIMEOUT_S)
        status = 201
    elif timeout is not None:
        remaining = (record.expires_at - datetime.now(UTC)).total_seconds()
        if timeout > remaining:
            record = await front.manager.set_timeout(record.id, timeout)
    return JSONResponse(sandbox_body(front, record, _data(record)), status)


async def _refresh(front: Front, request: Request, record: SandboxRecord) -> Response:
    body = await _body(request)
    duration = body.get("duration")
    if isinstance(duration, int) and duration > 0:
        await front.manager.set_timeout(record.id, duration)
    return Response(status_code=204)


_ACTIONS = {
    "kill": _kill,
    "timeout": _set_timeout,
    "pause": _pause,
    "connect": _connect,
    "refresh": _refresh,
}


@router.delete("/sandboxes/{sandbox_id}")
async def kill(request: Request, sandbox_id: str) -> Response:
    return await _act(request, sandbox_id, "kill")


@router.post("/sandboxes/{sandbox_id}/timeout")
async def set_timeout(request: Request, sandbox_id: str) -> Response:
    return await _act(request, sandbox_id, "timeout")


@router.post("/sandboxes/{sandbox_id}/pause")
async def pause(request: Request, sandbox_id: str) -> Response:
    return await _act(request, sandbox_id, "pause")


@router.post("/v2/sandboxes/{sandbox_id}/connect")
async def connect(request: Request, sandbox_id: str) -> Response:
    return await _act(request, sandbox_id, "connect")


@router.post("/sandboxes/{sandbox_id}/resume")
async def resume(request: Request, sandbox_id: str) -> Response:
    return await _act(request, sandbox_id, "connect")


@router.post("/sandboxes/{sandbox_id}/refreshes")
async def refresh(request: Request, sandbox_id: str) -> Response:
    return await _act(request, sandbox_id, "refresh")


@router.api_route("/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
async def unsupported(request: Request, rest: str) -> Response:
    """Templates, volumes, metrics, snapshots and the rest of E2B's API: 501."""
    try:
        await authenticate(request)
    except errors.EmberboxError as exc:
        return control_error(exc)
    return api_error(501, f"{request.method} /{rest} {UNSUPPORTED}")
