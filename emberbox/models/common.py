"""What every wire schema shares: the two base classes and the constrained field types.

Request models (``*Create``, ``*Request``, ``*Update``) forbid unknown fields, so a typo
in a client is a 422 naming the field instead of a silently ignored option. Public
models (``*Public``, ``*Response``) are what the server sends; they are frozen.

Limits set here are sanity bounds of the wire format; the service checks the operator's
limits (``Settings.max_vcpus`` ...) and answers 400/403 when a request passes them.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

MAX_TIMEOUT_S = 366 * 24 * 3600  # wire bound; Settings.max_timeout_s is the real limit
MAX_EXEC_TIMEOUT_S = 7 * 24 * 3600.0  # wire bound; Settings.max_exec_timeout_s applies

ImageName = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
]
MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=128)]
MetadataValue = Annotated[str, StringConstraints(max_length=1024)]
Metadata = Annotated[dict[MetadataKey, MetadataValue], Field(max_length=64)]
EnvName = Annotated[str, StringConstraints(max_length=256, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
# Bulk fields are bounded below the agent's 1 MiB frame (guest/protocol.py MAX_PAYLOAD),
# which carries a command's argv, env and stdin together; the body limit
# (Settings.max_request_body_bytes) bounds their sum, and a frame still too big is a 413.
MAX_ARG_CHARS = 128 * 1024  # one argument or shell line (Linux's MAX_ARG_STRLEN)
MAX_ARGS = 4096
MAX_ENV_VALUE_CHARS = 32 * 1024
MAX_STDIN_CHARS = 512 * 1024  # base64 in the frame: 4/3 of it
EnvValue = Annotated[str, StringConstraints(max_length=MAX_ENV_VALUE_CHARS, pattern=r"^[^\x00]*$")]
# additionalProperties: a name that does not match EnvName is refused, as the schema says.
Env = Annotated[
    dict[EnvName, EnvValue],
    Field(max_length=1024, json_schema_extra={"additionalProperties": False}),
]
HostPath = Annotated[str, StringConstraints(min_length=1, max_length=4096, pattern=r"^[^\x00]*$")]
GuestPath = Annotated[
    str, StringConstraints(min_length=1, max_length=4096, pattern=r"^[^\x00]*$")
]  # resolved by the guest (relative to /); the host never opens it
ObjectId = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
]
ShellCommand = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ARG_CHARS)]
Argument = Annotated[str, StringConstraints(max_length=MAX_ARG_CHARS)]
Argv = Annotated[list[Argument], Field(min_length=1, max_length=MAX_ARGS)]
Stdin = Annotated[str, StringConstraints(max_length=MAX_STDIN_CHARS)]


class RequestModel(BaseModel):
    """Base of what clients send: unknown fields are an error."""

    model_config = ConfigDict(extra="forbid")


class PublicModel(BaseModel):
    """Base of what the server sends: frozen."""

    model_config = ConfigDict(frozen=True)


def checked_cmd(cmd: list[str] | str) -> list[str] | str:
    """A command as ``ExecRequest`` and ``ProcessCreate`` take it: no NUL, not blank."""
    parts = [cmd] if isinstance(cmd, str) else cmd
    if any("\x00" in part for part in parts):
        raise ValueError("must not contain NUL characters")
    if not parts[0].strip():
        raise ValueError("the command (first element) must not be blank")
    return cmd
