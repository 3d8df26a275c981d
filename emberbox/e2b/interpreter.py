"""The code interpreter (``e2b-code-interpreter``, port 49999 on the envd URL):
``/execute`` and ``/contexts`` (PROTOCOL.md section 3), over the kernel programs of
:mod:`emberbox.e2b.kernel`.

A context is a kernel process in the guest, run as ``user`` in its ``cwd``; an
execution is a client process that talks to it, spawned and followed through
``manager.processes`` so its output streams as it comes. Contexts are found in the
guest by id (their socket and description file), so they outlive a server restart.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import secrets
import time
from typing import Any

import anyio
from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from emberbox import errors
from emberbox.agent_client.spec import ExecSpec, SpawnSpec
from emberbox.e2b import users
from emberbox.e2b.connect import Emit, EnvelopeStream
from emberbox.e2b.front import (
    HELPER_TIMEOUT_S,
    EnvdCall,
    api_error,
    audited,
    cut,
    envd_call,
    retry_after,
)
from emberbox.e2b.kernel import KERNEL, KERNEL_DIR

router = APIRouter(include_in_schema=False)

LANGUAGES = {"python", "python3"}
DEFAULT_CONTEXT = "default-python"
NOT_RUNNING = {
    "type": "error",
    "name": "ContextNotRunning",
    "value": "the context's kernel is not running",
    "traceback": "the context's kernel is not running: restart it",
}
START_WAIT_S = 300.0  # while the kernel still runs: slow under load, not stuck
USER = users.DEFAULT_USER


class NdjsonStream(EnvelopeStream):
    """One JSON document per line; a failure after the start is an ``error`` line."""

    media_type = "application/x-ndjson"

    def frame(self, message: dict[str, Any]) -> bytes:
        return json.dumps(message).encode() + b"\n"

    def closing(self, error: tuple[str, str] | None) -> bytes:
        if error is None:
            return b""
        return self.frame({"type": "error", "name": "SandboxError", "value": error[1],
                           "traceback": ""})  # fmt: skip


def _paths(context_id: str) -> tuple[str, str]:
    if not context_id.replace("-", "").isalnum() or len(context_id) > 64:
        raise errors.NotFound(f"context {context_id[:64]!r} not found")
    base = posixpath.join(KERNEL_DIR, context_id)
    return base + ".port", base + ".json"


async def _read_json(call: EnvdCall, path: str) -> dict[str, Any] | None:
    try:
        chunks = [c async for c in call.front.manager.files.read(call.sandbox_id, path)]
    except errors.NotFound:
        return None
    value = json.loads(b"".join(chunks) or b"{}")
    return value if isinstance(value, dict) else None


async def _start(call: EnvdCall, context_id: str, language: str, cwd: str) -> dict[str, Any]:
    """Start the kernel of a context, wait for the port it listens on, and describe the
    context (with that port) in the guest."""
    manager, sandbox_id = call.front.manager, call.sandbox_id
    port_file, desc = _paths(context_id)
    mkdir = ExecSpec(
        ["mkdir", "-p", KERNEL_DIR],
        env=USER.env(),
        cwd="/",
        timeout_s=HELPER_TIMEOUT_S,
        user=USER.run_as(),
    )
    made = await manager.exec(sandbox_id, mkdir)
    if made.exit_code != 0:
        raise errors.AgentRequestFailed(f"cannot make {KERNEL_DIR}: {made.stderr[-300:]!r}")
    with contextlib.suppress(errors.NotFound):  # a dead kernel's port is no sign of life
        await manager.files.remove(sandbox_id, port_file)
    argv = ["python3", "-I", "-u", "-c", KERNEL, port_file]
    kernel = SpawnSpec(argv, env=USER.env(), cwd=cwd, user=USER.run_as())
    pid = await manager.processes.spawn(sandbox_id, kernel)
    with anyio.move_on_after(START_WAIT_S):
        pause = 0.02
        while True:
            port = await _read_port(call, port_file)
            if port is not None:
                context = {"id": context_id, "language": language, "cwd": cwd, "pid": pid}
                context["port"] = port
                await manager.files.write(sandbox_id, desc, _chunks(json.dumps(context).encode()))
                return context
            if not (await manager.processes.status(sandbox_id, pid)).running:
                break
            await anyio.sleep(pause)
            pause = min(pause * 1.5, 0.5)
    await manager.processes.end(sandbox_id, pid)
    raise errors.AgentRequestFailed(f"the kernel of context {context_id} did not start")


async def _read_port(call: EnvdCall, path: str) -> int | None:
    try:
        chunks = [c async for c in call.front.manager.files.read(call.sandbox_id, path)]
    except errors.NotFound:
        return None
    text = b"".join(chunks).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


async def _chunks(data: bytes) -> Any:
    yield data


async def _stop(call: EnvdCall, context: dict[str, Any]) -> None:
    pid = context.get("pid")
    if isinstance(pid, int):
        await call.front.manager.processes.end(call.sandbox_id, pid)


def _public(context: dict[str, Any]) -> dict[str, Any]:
    return {"id": context["id"], "language": context["language"], "cwd": context["cwd"]}


def _language(value: Any) -> str:
    language = value or "python"
    if language not in LANGUAGES:
        raise errors.InvalidRequest(f"language {language!r} is not supported (python only)")
    return "python"


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw) if raw.strip() else {}
    except ValueError:
        raise errors.InvalidRequest("the body must be JSON") from None
    if not isinstance(body, dict):
        raise errors.InvalidRequest("the body must be a JSON object")
    return body


def _error(exc: errors.EmberboxError) -> Response:
    if exc.status_code == 502 or isinstance(exc, errors.Unauthorized):
        return api_error(exc.status_code, exc.message)
    status = exc.status_code if exc.status_code < 500 else 500
    return api_error(status, exc.message, retry_after(exc))


@router.post("/contexts")
async def create_context(request: Request) -> Response:
    try:
        call = await envd_call(request, token_optional=True)  # the SDK sends none
        body = await _body(request)
        cwd = USER.resolve(body.get("cwd"))
        async with audited(call, "e2b.context.create", cwd=cut(cwd)) as detail:
            context_id = secrets.token_hex(8)
            detail["context"] = context_id
            context = await _start(call, context_id, _language(body.get("language")), cwd)
    except errors.EmberboxError as exc:
        return _error(exc)
    return JSONResponse(_public(context))


@router.get("/contexts")
async def list_contexts(request: Request) -> Response:
    try:
        call = await envd_call(request, token_optional=True)  # the SDK sends none
        try:
            entries = await call.front.manager.files.list(call.sandbox_id, KERNEL_DIR)
        except errors.NotFound:
            entries = []
        found = []
        for entry in entries:
            if entry.name.endswith(".json"):
                context = await _read_json(call, posixpath.join(KERNEL_DIR, entry.name))
                if context is not None:
                    found.append(_public(context))
    except errors.EmberboxError as exc:
        return _error(exc)
    return JSONResponse(found)


async def _context(call: EnvdCall, context_id: str) -> dict[str, Any]:
    context = await _read_json(call, _paths(context_id)[1])
    if context is None:
        raise errors.NotFound(f"context {context_id} not found")
    return context


@router.delete("/contexts/{context_id}")
async def delete_context(request: Request, context_id: str) -> Response:
    try:
        call = await envd_call(request, token_optional=True)  # the SDK sends none
        async with audited(call, "e2b.context.delete", context=cut(context_id)):
            context = await _context(call, context_id)
            await _stop(call, context)
            for path in _paths(context_id):
                await call.front.manager.files.remove(call.sandbox_id, path)
    except errors.EmberboxError as exc:
        return _error(exc)
    return Response(status_code=204)


@router.post("/contexts/{context_id}/restart")
async def restart_context(request: Request, context_id: str) -> Response:
    try:
        call = await envd_call(request, token_optional=True)  # the SDK sends none
        async with audited(call, "e2b.context.restart", context=cut(context_id)):
            context = await _context(call, context_id)
            await _stop(call, context)
            await _start(call, context_id, context["language"], context["cwd"])
    except errors.EmberboxError as exc:
        return _error(exc)
    return Response(status_code=204)


@router.post("/execute")
async def execute(request: Request) -> Response:
    try:
        call = await envd_call(request)
        body = await _body(request)
        context_id = str(body.get("context_id") or "")
        if context_id:
            context = await _context(call, context_id)
        else:
            context_id = DEFAULT_CONTEXT
            found = await _read_json(call, _paths(DEFAULT_CONTEXT)[1])
            language = _language(body.get("language"))
            context = found or await _start(call, DEFAULT_CONTEXT, language, USER.home)
        port = context.get("port")
        if not isinstance(port, int):
            raise errors.Conflict(f"context {context_id} has no kernel port: restart it")
        code = str(body.get("code") or "")
        request_line = json.dumps({"code": code, "env_vars": body.get("env_vars")}).encode()
        await call.record("e2b.code.run", "ok", context=context_id, code=cut(code))
    except errors.EmberboxError as exc:
        return _error(exc)

    async def produce(emit: Emit) -> None:
        """The request over a connection to the kernel's port (through the agent: no
        process per execution), its answer lines streamed as they come."""
        pending = bytearray()
        async with call.front.manager.ports.tunnel(call.sandbox_id, port) as tunnel:
            await tunnel.send(request_line)
            await tunnel.send_eof()
            try:
                while chunk := await tunnel.receive():
                    pending.extend(chunk)
                    while b"\n" in pending:
                        line, _, rest = bytes(pending).partition(b"\n")
                        pending[:] = rest
                        message = json.loads(line)
                        if message.get("type") in ("stdout", "stderr"):
                            message["timestamp"] = int(time.time() * 1e9)
                        await emit(message)
            except errors.AgentRequestFailed as exc:
                if "PortUnreachable" not in str(exc.details) + exc.message:
                    raise
                await emit(NOT_RUNNING)

    return NdjsonStream(produce)
