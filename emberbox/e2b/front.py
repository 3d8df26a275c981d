"""What every E2B route shares: the service objects, who calls (an API key on the
control plane, the sandbox's envdAccessToken on envd), and E2B's error bodies.

Errors never leave as emberbox's own body: the control plane answers
``{"code": <int>, "message": ...}``; a Connect call ``{"code": "not_found", ...}``
(:func:`connect_code`); envd answers an unknown, stopped or paused sandbox with the
502 "was not found" that the SDK's ``is_running()`` and its "not running" error expect.
"""

from __future__ import annotations

import hmac
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse

from emberbox import errors
from emberbox.config import Settings
from emberbox.e2b.query import E2bData
from emberbox.service.sandboxes.manager import SandboxManager, SandboxRecord
from emberbox.service.sandboxes.state import SandboxState
from emberbox.service.tenancy.access import AuditEntry, Principal, Tenancy
from emberbox.service.tenancy.keys import parse_key

ENVD_VERSION = "0.6.3"  # the highest envd whose features are all served (PROTOCOL.md)
ENVD_PORT = 49983
INTERPRETER_PORT = 49999
# A helper the front runs in the guest (a stat, a mkdir, a chown, the fs helper) gets
# this explicit bound, not default_exec_timeout_s: that one (60 s, plus the agent client's
# 15 s grace: an ExecTimeout at 75 s) fired under heavy load on helpers that were only
# waiting for a CPU. The SDK's own request timeout is what ends a call that takes too long.
HELPER_TIMEOUT_S = 600.0
ARGV_MAX_CHARS = 1024  # an audited command, code or path is cut to this (as api/auth.py)
TOKENLESS_BUCKET = "e2b-tokenless:"  # the interpreter's context calls without a token

# Connect error codes by HTTP status, and back (PROTOCOL.md 2.1).
CONNECT_CODES: dict[int, str] = {
    400: "invalid_argument",
    401: "unauthenticated",
    403: "permission_denied",
    404: "not_found",
    409: "already_exists",
    413: "resource_exhausted",
    429: "resource_exhausted",
    500: "internal",
    502: "unavailable",
    503: "unavailable",
    504: "deadline_exceeded",
    507: "resource_exhausted",
}
CODE_STATUS: dict[str, int] = {
    "invalid_argument": 400,
    "unauthenticated": 401,
    "permission_denied": 403,
    "not_found": 404,
    "already_exists": 409,
    "failed_precondition": 412,
    "resource_exhausted": 429,
    "internal": 500,
    "unavailable": 503,
    "deadline_exceeded": 504,
    "canceled": 499,
}


class SandboxGone(errors.EmberboxError):
    """envd: the sandbox is unknown, stopped or paused (answered 502 "was not found")."""

    status_code = 502


@dataclass(frozen=True)
class Front:
    """The service objects the E2B routes call (``request.app.state.e2b``)."""

    settings: Settings
    manager: SandboxManager
    tenancy: Tenancy
    # (sandbox id, pid) -> the Start request's process config, for List (in memory: a
    # process started before a server restart is listed with its command line only)
    processes: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    # (sandbox id, watcher id) -> [pid, events file, lines consumed] (watch.py)
    watchers: dict[tuple[str, str], list[Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class EnvdCall:
    """An envd request that passed its checks: the running sandbox and who runs."""

    front: Front
    sandbox: SandboxRecord
    data: E2bData

    @property
    def sandbox_id(self) -> str:
        return self.sandbox.id

    async def record(self, action: str, outcome: str, **detail: Any) -> None:
        """An audit log entry for this call, as the sandbox's tenant and creating key
        (envd calls carry no API key; the access token is never part of it)."""
        entry = AuditEntry(
            self.data.tenant_id,
            action,
            outcome,
            key_id=self.data.key_id,
            target_id=self.sandbox_id,
            detail={"via": "envd", **detail},
        )
        await self.front.tenancy.audit(entry)


@asynccontextmanager
async def audited(call: EnvdCall, action: str, **detail: Any) -> AsyncIterator[dict[str, Any]]:
    """Audit what runs inside as ``action``: ``ok``, or the error's class name; the
    body may add to the detail it is given."""
    try:
        yield detail
    except errors.EmberboxError as exc:
        await call.record(action, type(exc).__name__, **detail)
        raise
    await call.record(action, "ok", **detail)


def cut(value: Any) -> Any:
    """A command, code or path as the audit log keeps it (ARGV_MAX_CHARS)."""
    if isinstance(value, str):
        return value[:ARGV_MAX_CHARS]
    if isinstance(value, list):
        return [cut(item) for item in value[:32]]
    return value


def get_front(connection: HTTPConnection) -> Front:
    front = connection.app.state.e2b
    assert isinstance(front, Front)
    return front


def api_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"code": status, "message": message}, status, headers=headers)


def control_error(exc: errors.EmberboxError) -> JSONResponse:
    """A control-plane answer for ``exc``; a 429 tells the SDK not to retry at once."""
    status = exc.status_code
    headers = None
    if isinstance(exc, errors.QuotaExceeded) and status in (429, 503):
        headers = {"Should-Retry": "false"}
    return api_error(status, exc.message, headers)


def connect_code(exc: errors.EmberboxError) -> str:
    if isinstance(exc, errors.ExecTimeout):
        return "deadline_exceeded"
    return CONNECT_CODES.get(exc.status_code, "internal")


def connect_error(code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"code": code, "message": message}, CODE_STATUS.get(code, 500), headers=headers
    )


def gone(sandbox_id: str) -> JSONResponse:
    return api_error(502, f"The sandbox {sandbox_id} was not found")


async def authenticate(connection: HTTPConnection) -> Principal:
    """The caller of a control-plane route, by ``X-API-KEY`` (or a Bearer key).

    A key that is not shaped like an emberbox key counts as none: the E2B SDK always
    sends one, so local mode (no keys at all) takes any; once keys exist it is a 401.
    """
    front = get_front(connection)
    key = connection.headers.get("x-api-key", "").strip() or None
    if key is None:
        auth = connection.headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        key = value.strip() if scheme.lower() == "bearer" and value.strip() else None
    if key is not None and parse_key(key) is None:
        key = None
    client = connection.client.host if connection.client is not None else ""
    server = connection.scope.get("server")
    return await front.tenancy.authenticate(
        key,
        client,
        server=str(server[0]) if server else "",
        host_header=connection.headers.get("host"),
    )


async def envd_call(connection: HTTPConnection, *, token_optional: bool = False) -> EnvdCall:
    """The sandbox an envd request names (``E2b-Sandbox-Id``), running, with the
    caller's ``X-Access-Token`` equal to its own. SandboxGone or Unauthorized.

    ``token_optional``: a request without the header passes (a wrong one never does);
    only for the code interpreter's context calls, which the SDK sends without it."""
    front = get_front(connection)
    sandbox_id = connection.headers.get("e2b-sandbox-id", "")
    if not sandbox_id.isalnum() or len(sandbox_id) > 64:
        raise SandboxGone(f"The sandbox {sandbox_id[:64]} was not found")
    try:
        record = await front.manager.get(sandbox_id)
    except errors.NotFound:
        raise SandboxGone(f"The sandbox {sandbox_id} was not found") from None
    data = E2bData.decode(record.metadata)
    if record.state is not SandboxState.RUNNING or data is None:
        raise SandboxGone(f"The sandbox {sandbox_id} was not found")
    token = connection.headers.get("x-access-token")
    if token is None and token_optional:
        _limit(front, f"{TOKENLESS_BUCKET}{sandbox_id}")  # never the creator's budget
        return EnvdCall(front, record, data)
    if not hmac.compare_digest((token or "").encode(), data.token.encode()):
        client = connection.client.host if connection.client is not None else ""
        wait_s = front.tenancy.failures.take(client)
        if wait_s > 0:
            raise errors.RateLimited(
                f"too many wrong access tokens from {client or 'this client'}; "
                f"retry in {wait_s:.2f} s",
                retry_after_s=wait_s,
                quota="failed_auth",
            )
        raise errors.Unauthorized("missing or wrong X-Access-Token for this sandbox")
    if data.key_id is not None:  # the creating key's rate limit (none in local mode)
        _limit(front, data.key_id)
    return EnvdCall(front, record, data)


def _limit(front: Front, bucket: str) -> None:
    """RateLimited when ``bucket`` (a key id) has no request left: the native API's
    per-key limit, shared by the control plane and envd calls of the key's sandboxes."""
    wait_s = front.tenancy.limiter.take(bucket)
    if wait_s > 0:
        rate, burst = front.settings.rate_limit_per_s, front.settings.rate_limit_burst
        raise errors.RateLimited(
            f"rate limit exceeded for key {bucket}: at most {rate:g} requests/s "
            f"(bursts of {burst}); retry in {wait_s:.2f} s",
            retry_after_s=wait_s,
            quota="rate_limit_per_s",
        )


def retry_after(exc: errors.EmberboxError) -> dict[str, str] | None:
    """``Retry-After`` for a RateLimited answer."""
    if isinstance(exc, errors.RateLimited):
        return {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
    return None


async def audit(
    front: Front,
    principal: Principal,
    action: str,
    target: str | None,
    outcome: str,
    **detail: Any,
) -> None:
    entry = AuditEntry(
        principal.tenant_id,
        action,
        outcome,
        key_id=principal.key_id,
        target_id=target,
        detail=detail,
    )
    await front.tenancy.audit(entry)
