"""What the MCP tools answer: small, flat models an agent reads easily (each becomes a
tool's output schema), built from the SDK's answers by pure functions."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from emberbox.sdk import CommandResult, FileInfo, RunResult, SandboxInfo

CodeStatus = Literal[
    "ok", "runtime_error", "compile_error", "timeout", "memory_limit", "output_limit"
]


class SandboxSummary(BaseModel):
    """A sandbox: pass its ``id`` as ``sandbox_id`` to the other tools."""

    id: str
    state: str = Field(description="creating, running, paused, stopping, stopped or error.")
    image: str
    vcpus: int
    memory_mib: int
    expires_at: str = Field(description="When the server kills it (ISO 8601, UTC).")
    error: str | None = Field(default=None, description="Why it is in state error.")


class SandboxListing(BaseModel):
    sandboxes: list[SandboxSummary]


class SandboxKilled(BaseModel):
    id: str
    killed: bool = True


class CodeResult(BaseModel):
    """How a program ended. Output is UTF-8 text, cut at the server's cap."""

    status: CodeStatus
    exit_code: int | None = Field(description="null when the program never ran.")
    stdout: str
    stderr: str
    compile_output: str = Field(default="", description="The compiler's output (c, c++).")
    time_ms: float | None = Field(description="Wall-clock time of the run (not the compile).")
    sandbox_id: str | None = Field(
        default=None, description="The sandbox it ran in; null: a fresh one, already gone."
    )


class CommandOutput(BaseModel):
    """How a command ended. A non-zero exit code is a result, not a tool error."""

    exit_code: int
    stdout: str
    stderr: str
    duration_ms: float
    timed_out: bool = Field(description="It ran past its timeout and was killed.")
    output_truncated: bool = Field(description="Output passed the server's cap and was cut.")


class FileContent(BaseModel):
    path: str
    encoding: Literal["utf-8", "base64"]
    content: str
    size: int = Field(description="Bytes in the file.")


class FileWritten(BaseModel):
    path: str
    size: int = Field(description="Bytes written.")


class FileEntry(BaseModel):
    name: str
    path: str
    type: str = Field(description="file, dir, symlink or other.")
    size: int


class FileListing(BaseModel):
    path: str
    entries: list[FileEntry]


def sandbox_summary(info: SandboxInfo) -> SandboxSummary:
    return SandboxSummary(
        id=info.id,
        state=info.state,
        image=info.image,
        vcpus=info.vcpus,
        memory_mib=info.memory_mib,
        expires_at=info.expires_at.isoformat(),
        error=info.error,
    )


def command_output(result: CommandResult) -> CommandOutput:
    return CommandOutput(
        exit_code=result.exit_code,
        stdout=result.stdout,
        stderr=result.stderr,
        duration_ms=result.duration_ms,
        timed_out=result.timed_out,
        output_truncated=result.output_truncated,
    )


def oneshot_result(result: RunResult) -> CodeResult:
    """A ``/v1/run`` answer (a fresh sandbox, already killed)."""
    return CodeResult(
        status=result.status,
        exit_code=result.exit_code,
        stdout=result.stdout,
        stderr=result.stderr,
        compile_output=result.compile_output,
        time_ms=result.time_ms,
    )


def file_entry(info: FileInfo) -> FileEntry:
    return FileEntry(name=info.name, path=info.path, type=info.type, size=info.size)
