"""Commands run to completion: ``POST /v1/sandboxes/{id}/exec`` and what it answers."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field, field_validator

from emberbox.models.common import (
    MAX_EXEC_TIMEOUT_S,
    Argv,
    Env,
    HostPath,
    PublicModel,
    RequestModel,
    ShellCommand,
    Stdin,
    checked_cmd,
)


class ExecRequest(RequestModel):
    """Run one command: a string goes through ``/bin/sh -c``, a list is an argv."""

    cmd: Argv | ShellCommand
    env: Env = Field(default_factory=dict, description="Added to the sandbox's environment.")
    cwd: HostPath | None = Field(default=None, description="Working directory in the guest.")
    timeout_s: float | None = Field(
        default=None,
        gt=0,
        le=MAX_EXEC_TIMEOUT_S,
        allow_inf_nan=False,
        description="Seconds before the command is killed; null uses the server default.",
    )
    stdin: Stdin | None = Field(
        default=None, description="Text fed to the command (UTF-8), at most 512 KiB."
    )
    stream: bool = Field(
        default=False,
        description=(
            "Answer `application/x-ndjson`: one StreamEvent per line as output comes "
            "(`stdout`/`stderr`), then one `exit` (or `error`) event."
        ),
    )

    @field_validator("cmd")
    @classmethod
    def _check_cmd(cls, cmd: list[str] | str) -> list[str] | str:
        return checked_cmd(cmd)


class ExecResponse(PublicModel):
    """What a finished command left. Output is UTF-8 decoded, invalid bytes replaced."""

    exit_code: int
    stdout: str
    stderr: str
    duration_ms: float
    timed_out: bool = False
    output_truncated: bool = False
    signal: int | None = Field(default=None, description="Signal that ended the command.")


class ExecLogEntryPublic(PublicModel):
    """One command run in a sandbox by ``exec`` (not its output: that was the answer's)."""

    id: int
    command: list[str] | str = Field(description="An argv, or a line run by `/bin/sh -c`.")
    started_at: datetime
    duration_ms: float
    exit_code: int | None = Field(description="Null when it never finished (an error).")
    timed_out: bool


class ExecLogList(PublicModel):
    """``GET /v1/sandboxes/{id}/execs``: the sandbox's commands, oldest first."""

    entries: list[ExecLogEntryPublic]
