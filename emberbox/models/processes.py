"""Background processes (``/v1/sandboxes/{id}/processes``) and the terminal's size."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StringConstraints, field_validator

from emberbox.models.common import (
    MAX_EXEC_TIMEOUT_S,
    Argv,
    Env,
    GuestPath,
    PublicModel,
    RequestModel,
    ShellCommand,
    checked_cmd,
)
from emberbox.models.events import ExitEvent


class PtySize(RequestModel):
    """A terminal's size in character cells."""

    cols: int = Field(ge=1, le=1000)
    rows: int = Field(ge=1, le=1000)


class PtyTicket(PublicModel):
    """A one-time pass to open a sandbox's terminal WebSocket from a browser, which
    cannot send a key there: offer ``protocols`` as the WebSocket's subprotocols."""

    ticket: str = Field(description="Single use, for this sandbox only; not a key.")
    expires_in_s: float = Field(description="Seconds it stays valid.")
    protocols: list[str] = Field(
        description='`["emberbox.pty", "emberbox.ticket.<ticket>"]`; the server answers '
        "with `emberbox.pty`."
    )


class ProcessCreate(RequestModel):
    """Start a process that runs in the background, in its own session."""

    cmd: Argv | ShellCommand
    env: Env = Field(default_factory=dict, description="Added to the sandbox's environment.")
    cwd: GuestPath | None = Field(default=None, description="Working directory in the guest.")
    timeout_s: float | None = Field(
        default=None,
        gt=0,
        le=MAX_EXEC_TIMEOUT_S,
        allow_inf_nan=False,
        description="Seconds before it is killed; null: it runs until it ends or the sandbox does.",
    )
    pty: PtySize | None = Field(default=None, description="Run it on a terminal of this size.")

    @field_validator("cmd")
    @classmethod
    def _check_cmd(cls, cmd: list[str] | str) -> list[str] | str:
        return checked_cmd(cmd)


class ProcessStarted(PublicModel):
    pid: int = Field(description="The process id in the guest.")


class ProcessPublic(PublicModel):
    """A process started with ``POST .../processes`` (running or ended)."""

    pid: int
    cmd: str
    running: bool
    exit_code: int | None = None
    pty: bool = False
    started_at: float | None = Field(default=None, description="Unix time, guest clock.")


class ProcessList(PublicModel):
    processes: list[ProcessPublic]


class ProcessStatusPublic(PublicModel):
    """Whether a process still runs and, once it ended, how."""

    pid: int
    running: bool
    exit_code: int | None = None
    signal: int | None = None
    duration_ms: float | None = None
    timed_out: bool = False
    output_truncated: bool = False
    memory_limited: bool = False

    def exit_event(self) -> ExitEvent:
        fields = self.model_dump(exclude={"pid", "running"})
        return ExitEvent(**fields)


class SignalRequest(RequestModel):
    """Send a signal: a name (``TERM``, ``SIGKILL``) or a number."""

    signal: (
        Annotated[str, StringConstraints(pattern=r"^(SIG)?[A-Z][A-Z0-9+-]{0,15}$")]
        | Annotated[int, Field(ge=1, le=64)]
    ) = "TERM"
    group: bool = Field(default=True, description="Signal its whole process group.")


class StdinWritten(PublicModel):
    written: int = Field(description="Bytes delivered to the process's stdin.")
