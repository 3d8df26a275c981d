"""envd's ``process.Process`` service: Start, Connect, List, SendInput, CloseStdin,
SendSignal, Update (PROTOCOL.md 2.1), over ``manager.processes``.

A process is a background process of the sandbox (``SpawnSpec``) with its real guest
pid; Start and Connect follow its output as ``data`` events and end with ``end``. The
``Connect-Timeout-Ms`` of Start is the process's own deadline: it is killed then and
the stream ends with ``deadline_exceeded`` (the SDK's TimeoutException).
"""

from __future__ import annotations

import base64
import functools
from typing import Any

import anyio
from fastapi import APIRouter, Request
from starlette.responses import Response

from emberbox import errors
from emberbox.agent_client.answers import ProcessStatus
from emberbox.agent_client.calls import OutputCallback
from emberbox.agent_client.spec import SpawnSpec
from emberbox.e2b import users
from emberbox.e2b.connect import (
    Emit,
    EnvelopeStream,
    deadline_s,
    error_answer,
    stream_request,
    unary,
)
from emberbox.e2b.front import EnvdCall, audited, cut

router = APIRouter(prefix="/process.Process", include_in_schema=False)

KEEPALIVE: dict[str, Any] = {"event": {"keepalive": {}}}
SIGNALS = {"SIGNAL_SIGKILL": "KILL", "SIGNAL_SIGTERM": "TERM", "SIGNAL_SIGINT": "INT"}
SIGNAL_NAMES = {9: "killed", 15: "terminated", 2: "interrupt", 1: "hangup"}


def _pid(body: dict[str, Any]) -> int:
    selector = body.get("process") or {}
    pid = selector.get("pid") if isinstance(selector, dict) else None
    if isinstance(pid, str) and pid.isdigit():
        pid = int(pid)
    if not isinstance(pid, int) or pid <= 0:
        if isinstance(selector, dict) and "tag" in selector:
            raise errors.NotFound(f"no process tagged {selector['tag']!r}")
        raise errors.InvalidRequest("process.pid must be a positive integer")
    return pid


def _size(pty: Any) -> tuple[int, int]:
    size = pty.get("size") if isinstance(pty, dict) else None
    if not isinstance(size, dict):
        return 80, 24
    return int(size.get("cols") or 80), int(size.get("rows") or 24)


def spawn_spec(
    body: dict[str, Any], user: users.User, deadline: float | None
) -> tuple[SpawnSpec, dict[str, Any]]:
    """The SpawnSpec of a Start request, and the config that List reports back."""
    process = body.get("process")
    if not isinstance(process, dict) or not isinstance(process.get("cmd"), str):
        raise errors.InvalidRequest("process.cmd is required")
    args = process.get("args") or []
    envs = process.get("envs") or {}
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise errors.InvalidRequest("process.args must be a list of strings")
    if not isinstance(envs, dict):
        raise errors.InvalidRequest("process.envs must be an object")
    cwd = user.resolve(process.get("cwd"))
    pty = body.get("pty")
    spec = SpawnSpec(
        [process["cmd"], *args],
        env={**user.env(), **envs},
        cwd=cwd,
        timeout_s=deadline,
        pty=_size(pty) if pty else None,
        user=user.run_as(),
    )
    config = {"cmd": process["cmd"], "args": args, "envs": envs, "cwd": cwd}
    return spec, config


def end_event(status: ProcessStatus) -> dict[str, Any]:
    code = status.exit_code if status.exit_code is not None else -1
    if status.signal is not None:
        name = SIGNAL_NAMES.get(status.signal, str(status.signal))
        end = {
            "exitCode": -1,
            "exited": False,
            "status": f"signal: {name}",
            "error": f"signal: {name}",
        }
    else:
        end = {"exitCode": code, "exited": True, "status": f"exit status {code}"}
    return {"event": {"end": end}}


def _forwarders(emit: Emit, pty: bool) -> tuple[OutputCallback, OutputCallback]:
    """Output callbacks that emit ``data`` events (all of a terminal's output is ``pty``)."""

    async def out(chunk: bytes) -> None:
        key = "pty" if pty else "stdout"
        await emit({"event": {"data": {key: base64.b64encode(chunk).decode()}}})

    async def err(chunk: bytes) -> None:
        await emit({"event": {"data": {"stderr": base64.b64encode(chunk).decode()}}})

    return out, err


async def _follow(call: EnvdCall, pid: int, emit: Emit, pty: bool) -> ProcessStatus:
    out, err = _forwarders(emit, pty)
    processes = call.front.manager.processes
    return await processes.follow(call.sandbox_id, pid, on_stdout=out, on_stderr=err)


async def _finish(call: EnvdCall, pid: int, emit: Emit, status: ProcessStatus) -> None:
    await emit(end_event(status))
    if status.timed_out:
        raise errors.ExecTimeout(f"process {pid} ran past its deadline and was killed")


@router.post("/Start")
async def start(request: Request) -> Response:
    try:
        call, body = await stream_request(request)
        user = users.from_authorization(request.headers.get("authorization"))
        spec, config = spawn_spec(body, user, deadline_s(request))
    except errors.EmberboxError as exc:
        return error_answer(exc)
    command = cut([config["cmd"], *config["args"]])
    shown = {"cmd": command, "cwd": config["cwd"], "user": user.name, "pty": bool(spec.pty)}
    tag = body.get("tag")
    entry = {
        "config": config,
        "pty": spec.pty is not None,
        **({"tag": tag} if isinstance(tag, str) else {}),
    }
    close_stdin = not body.get("stdin") and spec.pty is None

    async def produce(emit: Emit) -> None:
        """Started and followed in one agent request: the start event as soon as the pid
        is known, the audit entry alongside the output. A command that cannot start is
        answered with an HTTP error (``early_errors``), as E2B's envd answers it."""
        pid: int | None = None
        failure: errors.EmberboxError | OSError | None = None
        async with anyio.create_task_group() as tg:

            async def started(new_pid: int) -> None:
                nonlocal pid
                pid = new_pid
                call.front.processes[(call.sandbox_id, pid)] = entry
                await emit({"event": {"start": {"pid": pid}}})
                audit = functools.partial(call.record, "e2b.process.start", "ok", pid=pid)
                tg.start_soon(functools.partial(audit, **shown))

            out, err = _forwarders(emit, spec.pty is not None)
            try:
                status = await call.front.manager.processes.start(
                    call.sandbox_id,
                    spec,
                    started,
                    close_stdin=close_stdin,
                    on_stdout=out,
                    on_stderr=err,
                )
            except (errors.EmberboxError, OSError) as exc:  # raised below, not in a group
                failure = exc  # (OSError: the client left, EnvelopeStream's to handle)
        if failure is not None:
            if pid is None and isinstance(failure, errors.EmberboxError):
                await call.record("e2b.process.start", type(failure).__name__, **shown)
            raise failure
        assert pid is not None  # start() returns only after on_start
        call.front.processes.pop((call.sandbox_id, pid), None)
        await _finish(call, pid, emit, status)

    return EnvelopeStream(produce, KEEPALIVE, early_errors=True)


@router.post("/Connect")
async def connect(request: Request) -> Response:
    try:
        call, body = await stream_request(request)
        pid = _pid(body)
        status = await call.front.manager.processes.status(call.sandbox_id, pid)
    except errors.EmberboxError as exc:
        return error_answer(exc)
    deadline = deadline_s(request)
    known = call.front.processes.get((call.sandbox_id, pid), {})
    pty = bool(known.get("pty"))

    async def produce(emit: Emit) -> None:
        await emit({"event": {"start": {"pid": pid}}})
        with anyio.move_on_after(deadline if deadline is not None else float("inf")) as scope:
            final = await _follow(call, pid, emit, pty)
        if scope.cancelled_caught:
            raise errors.ExecTimeout(f"Connect to process {pid} reached its deadline")
        await _finish(call, pid, emit, final)

    del status
    return EnvelopeStream(produce, KEEPALIVE)


async def _list(call: EnvdCall, body: dict[str, Any], request: Request) -> dict[str, Any]:
    del body, request
    infos = await call.front.manager.processes.list(call.sandbox_id)
    out = []
    for info in infos:
        if not info.running:
            continue
        known = call.front.processes.get((call.sandbox_id, info.pid))
        entry: dict[str, Any] = {"pid": info.pid}
        if known is not None:
            entry["config"] = known["config"]
            if "tag" in known:
                entry["tag"] = known["tag"]
        else:
            entry["config"] = {"cmd": info.cmd, "args": [], "envs": {}}
        out.append(entry)
    return {"processes": out}


async def _send_input(call: EnvdCall, body: dict[str, Any], request: Request) -> dict[str, Any]:
    del request
    pid = _pid(body)
    data = body.get("input") or {}
    raw = data.get("stdin") or data.get("pty") or "" if isinstance(data, dict) else ""
    chunk = base64.b64decode(raw) if raw else b""
    await _running(call, pid)
    if chunk:
        await call.front.manager.processes.write_stdin(call.sandbox_id, pid, chunk)
    return {}


async def _close_stdin(call: EnvdCall, body: dict[str, Any], request: Request) -> dict[str, Any]:
    del request
    pid = _pid(body)
    await _running(call, pid)
    await call.front.manager.processes.write_stdin(call.sandbox_id, pid, b"", close=True)
    return {}


async def _send_signal(call: EnvdCall, body: dict[str, Any], request: Request) -> dict[str, Any]:
    del request
    pid = _pid(body)
    name = SIGNALS.get(str(body.get("signal")))
    if name is None:
        raise errors.InvalidRequest(f"unsupported signal {body.get('signal')!r}")
    async with audited(call, "e2b.process.signal", pid=pid, signal=name):
        await _running(call, pid)
        await call.front.manager.processes.signal(call.sandbox_id, pid, name)
    return {}


async def _update(call: EnvdCall, body: dict[str, Any], request: Request) -> dict[str, Any]:
    del request
    pid = _pid(body)
    if body.get("pty"):
        cols, rows = _size(body["pty"])
        await call.front.manager.processes.resize(call.sandbox_id, pid, cols, rows)
    return {}


async def _running(call: EnvdCall, pid: int) -> None:
    """NotFound unless ``pid`` is a process of the sandbox that still runs."""
    status = await call.front.manager.processes.status(call.sandbox_id, pid)
    if not status.running:
        raise errors.NotFound(f"process {pid} is not running")


@router.post("/List")
async def list_processes(request: Request) -> Response:
    return await unary(request, _list)


@router.post("/SendInput")
async def send_input(request: Request) -> Response:
    return await unary(request, _send_input)


@router.post("/StreamInput")
async def stream_input(request: Request) -> Response:
    return await unary(request, _send_input)


@router.post("/CloseStdin")
async def close_stdin(request: Request) -> Response:
    return await unary(request, _close_stdin)


@router.post("/SendSignal")
async def send_signal(request: Request) -> Response:
    return await unary(request, _send_signal)


@router.post("/Update")
async def update(request: Request) -> Response:
    return await unary(request, _update)
