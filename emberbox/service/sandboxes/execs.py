"""Commands run in a running sandbox (``SandboxManager.exec``), each logged in the store,
and :func:`run_command`, the one place where an exec the agent stopped answering after
its timeout becomes a timed-out result.

Execs take no lock: the guest agent multiplexes any number of them.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from datetime import datetime
from typing import Protocol

from emberbox import errors
from emberbox.agent_client.answers import ExecResult
from emberbox.agent_client.calls import OutputCallback
from emberbox.agent_client.spec import ExecSpec
from emberbox.service import metrics
from emberbox.service.images import defaults as image_defaults
from emberbox.service.sandboxes import validation
from emberbox.service.sandboxes.core import ManagerCore, not_running
from emberbox.service.sandboxes.state import SandboxState
from emberbox.store import ExecLogEntry, utcnow

log = logging.getLogger(__name__)


class Executor(Protocol):
    """``SandboxManager.exec``: what :func:`run_command` calls."""

    async def exec(
        self,
        sandbox_id: str,
        spec: ExecSpec,
        *,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> ExecResult: ...


async def run_command(
    manager: Executor,
    sandbox_id: str,
    spec: ExecSpec,
    *,
    on_stdout: OutputCallback | None = None,
    on_stderr: OutputCallback | None = None,
) -> ExecResult:
    """``manager.exec``, where an ExecTimeout that carries a partial result is that
    result with ``timed_out`` (the output that came); without one it is raised."""
    try:
        return await manager.exec(sandbox_id, spec, on_stdout=on_stdout, on_stderr=on_stderr)
    except errors.ExecTimeout as exc:
        if not isinstance(exc.result, ExecResult):
            raise
        return dataclasses.replace(exc.result, timed_out=True)


async def run_exec(
    core: ManagerCore,
    sandbox_id: str,
    spec: ExecSpec,
    *,
    on_stdout: OutputCallback | None = None,
    on_stderr: OutputCallback | None = None,
) -> ExecResult:
    """See :meth:`~emberbox.service.sandboxes.manager.SandboxManager.exec`."""
    core.open_store()
    validation.validate_command(spec)
    timeout_s = exec_timeout(core, spec.timeout_s)
    row, handle = await core.running(sandbox_id)
    spec = await image_defaults.for_settings(core.settings).apply(row.image, spec, row.env)
    spec = dataclasses.replace(
        spec,
        timeout_s=timeout_s,
        output_max_bytes=core.settings.exec_output_max_bytes,
    )
    validation.check_frame(spec)  # with the sandbox's env in it
    started, t0 = utcnow(), time.monotonic()
    try:
        result = await handle.agent.exec(spec, on_stdout=on_stdout, on_stderr=on_stderr)
    except errors.ExecTimeout:
        await _log_exec(core, sandbox_id, spec, started, t0, None, timed_out=True)
        raise
    except errors.EmberboxError as exc:
        await _log_exec(core, sandbox_id, spec, started, t0, None, timed_out=False)
        current = await core.db().get(sandbox_id)
        if current is not None and current.state != SandboxState.RUNNING:
            raise not_running(sandbox_id, current.state) from exc  # killed meanwhile
        raise
    await _log_exec(core, sandbox_id, spec, started, t0, result, timed_out=result.timed_out)
    return result


def exec_timeout(core: ManagerCore, timeout_s: float | None) -> float:
    """``timeout_s`` or the default, capped at ``max_exec_timeout_s``."""
    if timeout_s is None:
        timeout_s = core.settings.default_exec_timeout_s
    return min(float(timeout_s), core.settings.max_exec_timeout_s)


async def _log_exec(
    core: ManagerCore,
    sandbox_id: str,
    spec: ExecSpec,
    started: datetime,
    t0: float,
    result: ExecResult | None,
    *,
    timed_out: bool,
) -> None:
    outcome = "timeout" if timed_out else ("ok" if result is not None else "error")
    metrics.EXEC_SECONDS.labels(outcome).observe(time.monotonic() - t0)
    entry = ExecLogEntry(
        sandbox_id=sandbox_id,
        command=spec.command,
        started_at=started,
        duration_ms=result.duration_ms if result else (time.monotonic() - t0) * 1000,
        exit_code=result.exit_code if result else None,
        timed_out=timed_out,
    )
    try:  # the caller's result matters more than its log line
        await core.db().log_exec(entry)
    except Exception:
        log.exception("sandbox %s: could not write the exec log", sandbox_id)
