"""Commands run in a running sandbox (``SandboxManager.exec``), each logged in the store.

Execs take no lock: the guest agent multiplexes any number of them.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime

from emberbox import errors
from emberbox.agent_client.client import ExecLimits, ExecResult
from emberbox.service.sandboxes import validation
from emberbox.service.sandboxes.core import ManagerCore, not_running
from emberbox.service.sandboxes.handles import OutputCallback
from emberbox.service.sandboxes.state import SandboxState
from emberbox.store import ExecLogEntry, utcnow

log = logging.getLogger(__name__)


async def run_exec(
    core: ManagerCore,
    sandbox_id: str,
    cmd: list[str] | str,
    *,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    timeout_s: float | None = None,
    stdin: bytes | None = None,
    limits: ExecLimits | None = None,
    on_stdout: OutputCallback | None = None,
    on_stderr: OutputCallback | None = None,
) -> ExecResult:
    """See :meth:`~emberbox.service.sandboxes.manager.SandboxManager.exec`."""
    core.open_store()
    validation.validate_command(cmd, cwd)
    validation.validate_env(env or {}, "env")
    timeout = exec_timeout(core, timeout_s)
    row, handle = await core.running(sandbox_id)
    started, t0 = utcnow(), time.monotonic()
    try:
        result = await handle.exec(
            cmd,
            env={**row.env, **(env or {})},
            cwd=cwd,
            timeout_s=timeout,
            stdin=stdin,
            output_max_bytes=core.settings.exec_output_max_bytes,
            limits=limits,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
        )
    except errors.ExecTimeout as exc:
        partial = exc.result if isinstance(exc.result, ExecResult) else None
        await _log_exec(core, sandbox_id, cmd, started, t0, partial, timed_out=True)
        raise
    except errors.EmberboxError as exc:
        await _log_exec(core, sandbox_id, cmd, started, t0, None, timed_out=False)
        current = await core.db().get(sandbox_id)
        if current is not None and current.state != SandboxState.RUNNING:
            raise not_running(sandbox_id, current.state) from exc  # killed meanwhile
        raise
    await _log_exec(core, sandbox_id, cmd, started, t0, result, timed_out=result.timed_out)
    return result


def exec_timeout(core: ManagerCore, timeout_s: float | None) -> float:
    """``timeout_s`` or the default, capped at ``max_exec_timeout_s``."""
    if timeout_s is None:
        timeout_s = core.settings.default_exec_timeout_s
    if not timeout_s > 0:
        raise errors.InvalidRequest(f"timeout_s must be positive (got {timeout_s})")
    return min(float(timeout_s), core.settings.max_exec_timeout_s)


async def _log_exec(
    core: ManagerCore,
    sandbox_id: str,
    cmd: list[str] | str,
    started: datetime,
    t0: float,
    result: ExecResult | None,
    *,
    timed_out: bool,
) -> None:
    entry = ExecLogEntry(
        sandbox_id=sandbox_id,
        command=cmd,
        started_at=started,
        duration_ms=result.duration_ms if result else (time.monotonic() - t0) * 1000,
        exit_code=result.exit_code if result else None,
        timed_out=timed_out,
    )
    try:  # the caller's result matters more than its log line
        await core.db().log_exec(entry)
    except Exception:
        log.exception("sandbox %s: could not write the exec log", sandbox_id)
