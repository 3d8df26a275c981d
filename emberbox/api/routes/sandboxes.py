"""``/v1/sandboxes``: create, list, inspect, extend, pause, resume, exec in and kill
sandboxes. Snapshots (``POST /v1/sandboxes/{id}/snapshots``) are in :mod:`.snapshots`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, Path, Query, Request, Response

from emberbox import errors
from emberbox.agent_client.spec import ExecSpec
from emberbox.api import views
from emberbox.api.auth import PrincipalDep, TenancyDep, owner_kwargs, scope_kwargs
from emberbox.api.deps import ManagerDep, parse_metadata_filter, state_from_name
from emberbox.api.errors import error_responses
from emberbox.api.streams import (
    NDJSON,
    STREAM_EVENT_SCHEMA,
    OutputEvents,
    StreamedResponse,
    Write,
    json_response,
    ndjson_response,
)
from emberbox.models import (
    ExecLogList,
    ExecRequest,
    ExecResponse,
    SandboxCreate,
    SandboxList,
    SandboxPublic,
    SandboxStateName,
    TimeoutUpdate,
)
from emberbox.service.sandboxes.execs import run_command
from emberbox.service.sandboxes.reserved import RESERVED_PREFIX
from emberbox.service.sandboxes.state import SandboxState

if TYPE_CHECKING:
    from emberbox.service.sandboxes.manager import SandboxManager

router = APIRouter(prefix="/v1/sandboxes", tags=["sandboxes"])

SandboxId = Annotated[str, Path(min_length=1, max_length=128, description="Sandbox id")]


@router.post(
    "",
    status_code=201,
    response_model=SandboxPublic,
    responses=error_responses(400, 403, 404, 409, 422, 502, 503),
)
async def create_sandbox(
    body: SandboxCreate,
    request: Request,
    manager: ManagerDep,
    principal: PrincipalDep,
    tenancy: TenancyDep,
) -> SandboxPublic:
    """Boot a sandbox, or fork one from `snapshot_id`; answers once its agent is ready."""
    if body.snapshot_id is not None:  # another tenant's snapshot is an unknown one
        await tenancy.check_owner(principal, "snapshot", body.snapshot_id)
    if any(key.startswith(RESERVED_PREFIX) for key in body.metadata or {}):
        raise errors.InvalidRequest(f"metadata keys starting {RESERVED_PREFIX!r} are reserved")
    record = await manager.create(**body.model_dump(), **owner_kwargs(principal))
    request.state.audit_target = record.id
    return views.sandbox_public(record)


@router.get("", response_model=SandboxList, responses=error_responses(400, 422))
async def list_sandboxes(
    request: Request,
    manager: ManagerDep,
    principal: PrincipalDep,
    state: Annotated[SandboxStateName | None, Query(description="Only this state")] = None,
) -> SandboxList:
    """List your sandboxes (an admin key: everyone's); filter by `state=` and any number
    of `metadata.KEY=VALUE`."""
    metadata = parse_metadata_filter(request.query_params.multi_items(), allowed={"state"})
    records = await manager.list(
        state=state_from_name(state), metadata=metadata or None, **scope_kwargs(principal)
    )
    return SandboxList(sandboxes=[views.sandbox_public(r) for r in records])


@router.get("/{sandbox_id}", response_model=SandboxPublic, responses=error_responses(404, 422))
async def get_sandbox(sandbox_id: SandboxId, manager: ManagerDep) -> SandboxPublic:
    return views.sandbox_public(await manager.get(sandbox_id))


@router.get("/{sandbox_id}/execs", response_model=ExecLogList, responses=error_responses(404, 422))
async def exec_log(sandbox_id: SandboxId, manager: ManagerDep) -> ExecLogList:
    """The commands run by `exec` in this sandbox, oldest first: argv, start, duration,
    exit code (not their output)."""
    entries = await manager.exec_log(sandbox_id)
    return ExecLogList(entries=[views.exec_log_entry(entry) for entry in entries])


@router.delete(
    "/{sandbox_id}",
    status_code=204,
    response_class=Response,
    responses=error_responses(404, 422, 502),
)
async def kill_sandbox(sandbox_id: SandboxId, manager: ManagerDep) -> Response:
    """Kill a sandbox. Killing a stopped one again is a no-op (204)."""
    await manager.get(sandbox_id)  # an unknown id is a 404, not a silent no-op
    await manager.kill(sandbox_id)
    return Response(status_code=204)


@router.post(
    "/{sandbox_id}/timeout",
    response_model=SandboxPublic,
    responses=error_responses(400, 404, 409, 422),
)
async def set_timeout(
    sandbox_id: SandboxId, body: TimeoutUpdate, manager: ManagerDep
) -> SandboxPublic:
    """Kill the sandbox `timeout_s` seconds from now instead of at its current deadline."""
    return views.sandbox_public(await manager.set_timeout(sandbox_id, body.timeout_s))


@router.post(
    "/{sandbox_id}/pause",
    response_model=SandboxPublic,
    responses=error_responses(404, 409, 422, 502),
)
async def pause_sandbox(sandbox_id: SandboxId, manager: ManagerDep) -> SandboxPublic:
    """Save a running sandbox to disk and stop its VMM; state `paused`. 409 unless running."""
    return views.sandbox_public(await manager.pause(sandbox_id))


@router.post(
    "/{sandbox_id}/resume",
    response_model=SandboxPublic,
    responses=error_responses(403, 404, 409, 422, 502),
)
async def resume_sandbox(sandbox_id: SandboxId, manager: ManagerDep) -> SandboxPublic:
    """Restore a paused sandbox where it left off; state `running`. 409 unless paused."""
    return views.sandbox_public(await manager.resume(sandbox_id))


@router.post(
    "/{sandbox_id}/exec",
    response_model=ExecResponse,
    responses={
        **error_responses(400, 404, 409, 422, 502, 504),
        200: {"content": {NDJSON: {"schema": STREAM_EVENT_SCHEMA}}},
    },
)
async def exec_command(
    sandbox_id: SandboxId, body: ExecRequest, manager: ManagerDep
) -> ExecResponse | StreamedResponse:
    """Run a command to completion. A timed-out command answers 200 with `timed_out`.

    With `"stream": true` the answer is NDJSON, one event per line as the command runs:
    `{"type": "stdout"|"stderr", "data": text, "data_b64"?: exact bytes}` for each chunk
    of output (`data_b64` only when the bytes are not valid UTF-8), then
    `{"type": "exit", "exit_code", "duration_ms", "timed_out", ...}`, or
    `{"type": "error", "error": {"type", "message"}}` if it failed after it began.
    """
    spec = ExecSpec(
        body.cmd,
        env=body.env,
        cwd=body.cwd,
        timeout_s=body.timeout_s,
        stdin=None if body.stdin is None else body.stdin.encode("utf-8"),
    )
    if body.stream:
        return await _stream_command(manager, sandbox_id, spec)
    result = await run_command(manager, sandbox_id, spec)
    return json_response(views.exec_response(result))  # encoded as it is sent: see there


async def _stream_command(
    manager: SandboxManager, sandbox_id: str, spec: ExecSpec
) -> StreamedResponse:
    record = await manager.get(sandbox_id)  # 404 and 409 while we can still say so
    if record.state is not SandboxState.RUNNING:
        raise errors.Conflict(
            f"sandbox {sandbox_id} is {record.state.value}", sandbox_id=sandbox_id
        )

    async def produce(write: Write) -> None:
        events = OutputEvents(write)
        try:
            result = await run_command(
                manager, sandbox_id, spec, on_stdout=events.stdout, on_stderr=events.stderr
            )
        except Exception as exc:
            await events.fail(exc)
            return
        await events.finish(views.exec_exit_event(result))

    return ndjson_response(produce)
