"""``/v1/sandboxes/{id}/pty?cols=&rows=``: an interactive terminal over a WebSocket.

- Binary frames, both ways, are the terminal's bytes: keystrokes in, screen out.
- Text frames are JSON. The client sends ``{"type": "resize", "cols", "rows"}``. The
  server sends ``{"type": "started", "pid"}`` first and ``{"type": "exit", ...}`` (as in
  NDJSON streams) when the program ended, then closes with 1000.
- An error is ``{"type": "error", "error": {"type", "message"}}``, then a close with
  code 4000 + its HTTP status (4401 wrong key, 4404 no such sandbox, 4409 not running,
  4400 a text frame that is not a resize). Errors always end the session.
- A client that disconnects ends the program: its process group gets SIGKILL.

The program is ``cmd`` (through ``sh -c``) or a login shell (bash where there is one).

Authentication: a key in the handshake's headers, as on any call; or, from a browser
(which cannot set headers here), a ticket from ``POST /v1/sandboxes/{id}/pty/ticket``
offered as the subprotocol ``emberbox.ticket.<ticket>`` beside ``emberbox.pty``, which
the server answers with (:mod:`emberbox.api.browsers`).
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Annotated

import anyio
from fastapi import APIRouter, Query, WebSocket

from emberbox import errors
from emberbox.agent_client.spec import SpawnSpec
from emberbox.api import browsers, views
from emberbox.api.auth import PrincipalDep, TenancyDep
from emberbox.api.deps import ManagerDep, get_processes, require_api_key
from emberbox.api.errors import error_detail, error_responses
from emberbox.api.routes.sandboxes import SandboxId
from emberbox.api.streams import event_line
from emberbox.models import ErrorEvent, PtySize, PtyTicket
from emberbox.service.guestio.processes import TERMINAL_SHELL, Processes

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/sandboxes", tags=["terminal"])
# Plain HTTP, guarded like every API call (app.py): the browser's way onto the socket.
ticket_router = APIRouter(prefix="/v1/sandboxes", tags=["terminal"])

CLOSE_NORMAL = 1000
CLOSE_ERROR_BASE = 4000  # + the HTTP status of the error


@router.websocket("/{sandbox_id}/pty")
async def terminal(
    websocket: WebSocket,
    sandbox_id: str,
    cols: Annotated[int, Query(description="Terminal width in columns")] = 80,
    rows: Annotated[int, Query(description="Terminal height in rows")] = 24,
    cmd: Annotated[str | None, Query(description="Program to run (default: login shell)")] = None,
) -> None:
    offered = websocket.scope.get("subprotocols", ())
    await websocket.accept(subprotocol=browsers.chosen_protocol(offered))
    processes = get_processes(websocket)
    terminal = SpawnSpec(cmd or TERMINAL_SHELL, pty=(cols, rows))
    try:
        require_api_key(websocket)
        pid = await processes.spawn(sandbox_id, terminal)
    except errors.EmberboxError as exc:
        await _close_with_error(websocket, exc)
        return
    try:
        await websocket.send_json({"type": "started", "pid": pid})
        async with anyio.create_task_group() as tg:
            tg.start_soon(_output, websocket, processes, sandbox_id, pid, tg.cancel_scope)
            try:
                await _input(websocket, processes, sandbox_id, pid)
            except errors.EmberboxError as exc:  # a bad frame, or the agent failed
                await _close_with_error(websocket, exc)
            tg.cancel_scope.cancel()
    except Exception as exc:  # the client went away mid-send: nothing left to tell it
        log.debug("terminal %s/%d: %r", sandbox_id, pid, exc)
    finally:
        await processes.end(sandbox_id, pid)


@ticket_router.post(
    "/{sandbox_id}/pty/ticket",
    response_model=PtyTicket,
    responses=error_responses(404, 422),
)
async def terminal_ticket(
    sandbox_id: SandboxId, principal: PrincipalDep, tenancy: TenancyDep, manager: ManagerDep
) -> PtyTicket:
    """A single-use ticket, valid for `expires_in_s` seconds (30 by default), that opens
    this sandbox's terminal WebSocket as you: for browsers, which cannot send a key on a
    WebSocket. Offer `protocols` as the socket's subprotocols."""
    await manager.get(sandbox_id)  # an unknown id is a 404 now, not at the socket
    ticket = tenancy.tickets.issue(principal, sandbox_id)
    return PtyTicket(
        ticket=ticket,
        expires_in_s=tenancy.tickets.ttl_s,
        protocols=[browsers.PTY_PROTOCOL, browsers.TICKET_PREFIX + ticket],
    )


async def _output(
    websocket: WebSocket, processes: Processes, sandbox_id: str, pid: int, done: anyio.CancelScope
) -> None:
    """Screen output to the client until the program ends; then its exit and a close."""
    try:
        final = await processes.follow(
            sandbox_id, pid, on_stdout=websocket.send_bytes, on_stderr=websocket.send_bytes
        )
        exit_event = views.process_status_public(final).exit_event()
        await websocket.send_text(event_line(exit_event).decode())
        await websocket.close(CLOSE_NORMAL)
    except errors.EmberboxError as exc:
        await _close_with_error(websocket, exc)
    finally:
        done.cancel()


async def _input(websocket: WebSocket, processes: Processes, sandbox_id: str, pid: int) -> None:
    """Keystrokes and resizes from the client until it disconnects. Input the ended
    program can no longer take is dropped: the output side sends its exit."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("bytes") is not None:
            with contextlib.suppress(errors.Conflict):
                await processes.write_stdin(sandbox_id, pid, message["bytes"])
        elif message.get("text") is not None:
            size = _resize_request(message["text"])
            with contextlib.suppress(errors.Conflict):
                await processes.resize(sandbox_id, pid, size.cols, size.rows)


def _resize_request(text: str) -> PtySize:
    try:
        message = json.loads(text)
    except ValueError:
        message = None
    if not isinstance(message, dict) or message.get("type") != "resize":
        raise errors.InvalidRequest(
            'text frames must be {"type": "resize", "cols": N, "rows": N}; '
            "send keystrokes as binary frames"
        )
    try:
        return PtySize.model_validate({"cols": message.get("cols"), "rows": message.get("rows")})
    except ValueError as exc:
        raise errors.InvalidRequest(f"bad resize message: {exc}") from None


async def _close_with_error(websocket: WebSocket, exc: errors.EmberboxError) -> None:
    try:
        await websocket.send_text(event_line(ErrorEvent(error=error_detail(exc))).decode())
        reason = exc.message.encode()[:120].decode(errors="ignore")  # at most 123 bytes
        await websocket.close(CLOSE_ERROR_BASE + exc.status_code, reason=reason)
    except Exception:  # already closed by the client
        log.debug("terminal: could not report %r", exc)
