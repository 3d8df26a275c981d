"""``/v1/sandboxes/{id}/processes``: background processes. Start one (it outlives the
request and other execs), list them, read a status, follow the output as NDJSON, feed
stdin, send signals, resize a terminal, and forget an ended one."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import anyio
from fastapi import APIRouter, Path, Query, Request, Response

from emberbox import errors
from emberbox.agent_client.spec import SpawnSpec
from emberbox.api import views
from emberbox.api.deps import ProcessesDep
from emberbox.api.errors import error_responses
from emberbox.api.routes.sandboxes import SandboxId
from emberbox.api.streams import (
    BINARY_SCHEMA,
    NDJSON,
    OCTET_STREAM,
    STREAM_EVENT_SCHEMA,
    OutputEvents,
    StreamedResponse,
    Write,
    ndjson_response,
    streamed_content,
)
from emberbox.models import (
    ProcessCreate,
    ProcessList,
    ProcessStarted,
    ProcessStatusPublic,
    PtySize,
    SignalRequest,
    StdinWritten,
    StreamEvent,
)
from emberbox.service.guestio.processes import Processes

if TYPE_CHECKING:
    from emberbox.agent_client.client import ProcessStatus

router = APIRouter(prefix="/v1/sandboxes/{sandbox_id}/processes", tags=["processes"])

Pid = Annotated[int, Path(ge=1, le=1 << 22, description="Process id in the guest")]
QUIET_S = 0.5  # follow=false: the buffered output has arrived once this long passes quiet

RAW_BODY: dict[str, Any] = {
    "requestBody": {
        "required": False,
        "content": {OCTET_STREAM: {"schema": BINARY_SCHEMA}},
    }
}


@router.post(
    "",
    status_code=201,
    response_model=ProcessStarted,
    responses=error_responses(400, 404, 409, 422, 502),
)
async def start_process(
    sandbox_id: SandboxId, body: ProcessCreate, processes: ProcessesDep
) -> ProcessStarted:
    """Start a command in the background, in its own session; answers its pid at once."""
    spec = SpawnSpec(
        body.cmd,
        env=body.env,
        cwd=body.cwd,
        timeout_s=body.timeout_s,
        pty=None if body.pty is None else (body.pty.cols, body.pty.rows),
    )
    pid = await processes.spawn(sandbox_id, spec)
    return ProcessStarted(pid=pid)


@router.get("", response_model=ProcessList, responses=error_responses(404, 409, 422, 502))
async def list_processes(sandbox_id: SandboxId, processes: ProcessesDep) -> ProcessList:
    """The processes started in the background, running or ended (until forgotten)."""
    found = await processes.list(sandbox_id)
    return ProcessList(processes=[views.process_public(info) for info in found])


@router.get(
    "/{pid}", response_model=ProcessStatusPublic, responses=error_responses(404, 409, 422, 502)
)
async def get_process(
    sandbox_id: SandboxId, pid: Pid, processes: ProcessesDep
) -> ProcessStatusPublic:
    """Whether it runs and, once it ended, its exit code (or signal) and duration."""
    return views.process_status_public(await processes.status(sandbox_id, pid))


@router.delete(
    "/{pid}",
    status_code=204,
    response_class=Response,
    responses=error_responses(404, 409, 422, 502),
)
async def forget_process(sandbox_id: SandboxId, pid: Pid, processes: ProcessesDep) -> Response:
    """Drop an ended process's record and buffered output (409 while it runs)."""
    await processes.forget(sandbox_id, pid)
    return Response(status_code=204)


@router.get(
    "/{pid}/output",
    response_model=StreamEvent,  # never validated (a Response is returned): names the schemas
    response_class=StreamedResponse,
    responses={
        **streamed_content(NDJSON, STREAM_EVENT_SCHEMA),
        **error_responses(404, 409, 422, 502),
    },
)
async def process_output(
    sandbox_id: SandboxId,
    pid: Pid,
    processes: ProcessesDep,
    follow: Annotated[bool, Query(description="Keep streaming until it ends")] = True,
    from_start: Annotated[bool, Query(description="Replay its buffered output first")] = True,
) -> StreamedResponse:
    """Its output as NDJSON events, as `exec` with `"stream": true` sends them: the
    buffered output (up to 1 MiB, with `from_start`), then, with `follow`, live output
    and one `exit` event when it ends. Without `follow` the stream ends once the
    buffered output is out; it has an `exit` event only if the process had ended."""
    status = await processes.status(sandbox_id, pid)  # 404 and 409 while we still can

    async def produce(write: Write) -> None:
        events = OutputEvents(write)
        try:
            if follow or not status.running:
                final: ProcessStatus | None = await processes.follow(
                    sandbox_id,
                    pid,
                    from_start=from_start,
                    on_stdout=events.stdout,
                    on_stderr=events.stderr,
                )
            else:
                final = await _buffered_output(processes, sandbox_id, pid, from_start, events)
        except Exception as exc:
            await events.fail(exc)
            return
        if final is None:
            await events.flush()
        else:
            await events.finish(views.process_status_public(final).exit_event())

    return ndjson_response(produce)


async def _buffered_output(
    processes: Processes, sandbox_id: str, pid: int, from_start: bool, events: OutputEvents
) -> ProcessStatus | None:
    """Follow until the output goes quiet for QUIET_S (the buffer is out) or it ends."""
    last = anyio.current_time()

    async def stdout(chunk: bytes) -> None:
        nonlocal last
        last = anyio.current_time()
        await events.stdout(chunk)

    async def stderr(chunk: bytes) -> None:
        nonlocal last
        last = anyio.current_time()
        await events.stderr(chunk)

    async def stop_when_quiet(scope: anyio.CancelScope) -> None:
        while True:  # output moves `last` on: sleep until QUIET_S after it
            quiet_s = anyio.current_time() - last
            if quiet_s >= QUIET_S:
                scope.cancel()
                return
            await anyio.sleep(QUIET_S - quiet_s)

    final = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(stop_when_quiet, tg.cancel_scope)
        final = await processes.follow(
            sandbox_id, pid, from_start=from_start, on_stdout=stdout, on_stderr=stderr
        )
        tg.cancel_scope.cancel()
    return final


@router.post(
    "/{pid}/stdin",
    response_model=StdinWritten,
    responses=error_responses(400, 404, 409, 413, 422, 502),
    openapi_extra=RAW_BODY,
)
async def write_stdin(
    sandbox_id: SandboxId,
    pid: Pid,
    request: Request,
    processes: ProcessesDep,
    close: Annotated[bool, Query(description="Close its stdin after these bytes")] = False,
) -> StdinWritten:
    """Feed the request body (raw bytes) to its stdin; `close=true` ends its input."""
    size = content_length(request)
    processes.check_upload_size(size)
    written = await processes.write_stdin(sandbox_id, pid, request.stream(), close=close, size=size)
    return StdinWritten(written=written)


@router.post(
    "/{pid}/signal",
    status_code=204,
    response_class=Response,
    responses=error_responses(400, 404, 409, 422, 502),
)
async def signal_process(
    sandbox_id: SandboxId, pid: Pid, body: SignalRequest, processes: ProcessesDep
) -> Response:
    """Send it a signal (default TERM), by default to its whole process group."""
    await processes.signal(sandbox_id, pid, body.signal, group=body.group)
    return Response(status_code=204)


@router.post(
    "/{pid}/resize",
    status_code=204,
    response_class=Response,
    responses=error_responses(400, 404, 409, 422, 502),
)
async def resize_terminal(
    sandbox_id: SandboxId, pid: Pid, body: PtySize, processes: ProcessesDep
) -> Response:
    """Resize its terminal (it gets SIGWINCH); 409 when it runs without one."""
    await processes.resize(sandbox_id, pid, body.cols, body.rows)
    return Response(status_code=204)


def content_length(request: Request) -> int | None:
    """The announced body size, None when the body is chunked."""
    value = request.headers.get("content-length")
    if value is None:
        return None
    if not value.isdigit():
        raise errors.InvalidRequest(f"invalid Content-Length {value!r}")
    return int(value)
