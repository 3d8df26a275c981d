"""Wire schemas shared by the HTTP API, the SDK and the CLI (pydantic v2).

Request models (``*Create``, ``*Request``, ``*Update``) forbid unknown fields, so a typo
in a client is a 422 naming the field instead of a silently ignored option. Public
models (``*Public``, ``*Response``) are what the server sends; they never carry host
details (work directories, VMM pids) or secrets (the sandbox's environment).

Limits set here are sanity bounds of the wire format; the service checks the operator's
limits (``Settings.max_vcpus`` ...) and answers 400/403 when a request passes them.
"""

from __future__ import annotations

import base64
import math
import shlex
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

if TYPE_CHECKING:
    from emberbox.agent_client.client import ExecResult, FileInfo, ProcessInfo, ProcessStatus
    from emberbox.images.registry import ImageInfo
    from emberbox.service.sandboxes.manager import SandboxRecord
    from emberbox.service.snapshots.records import SnapshotRecord

# The values of emberbox.service.sandboxes.state.SandboxState, as they travel on the wire.
SandboxStateName = Literal["creating", "running", "paused", "stopping", "stopped", "error"]

MAX_TIMEOUT_S = 366 * 24 * 3600  # wire bound; Settings.max_timeout_s is the real limit
MAX_EXEC_TIMEOUT_S = 7 * 24 * 3600.0  # wire bound; Settings.max_exec_timeout_s applies

ImageName = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
]
MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=128)]
MetadataValue = Annotated[str, StringConstraints(max_length=1024)]
Metadata = Annotated[dict[MetadataKey, MetadataValue], Field(max_length=64)]
EnvName = Annotated[str, StringConstraints(max_length=256, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
EnvValue = Annotated[str, StringConstraints(pattern=r"^[^\x00]*$")]
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


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Public(BaseModel):
    model_config = ConfigDict(frozen=True)


# --- sandboxes ---------------------------------------------------------------------------


AllowEntry = Annotated[str, StringConstraints(min_length=1, max_length=300)]


class NetworkRequest(_Request):
    """A sandbox's network (docs/networking.md). Private, link-local and loopback ranges
    and the host's own addresses stay unreachable whatever ``allow`` says."""

    egress: Literal["none", "allowlist", "full"] = Field(
        default="none",
        description="`none`: no network; `allowlist`: only `allow`; `full`: the internet.",
    )
    allow: list[AllowEntry] = Field(
        default_factory=list,
        max_length=1024,
        description=(
            "With `allowlist`: IP, CIDR, IP:port, CIDR:port, host:port or host (a host name "
            "is resolved once, at create time). A port allows TCP and UDP to it."
        ),
    )


class SandboxCreate(_Request):
    """Ask for a new sandbox. Unset fields take the server's defaults (``Settings``)."""

    image: ImageName | None = Field(
        default=None,
        description="Image name; null uses the snapshot's, else the server default (`default`).",
    )
    vcpus: int | None = Field(
        default=None, ge=1, le=64, description="Virtual CPUs; null uses the server default (1)."
    )
    memory_mib: int | None = Field(
        default=None,
        ge=128,  # less does not boot the guest (service.validation.MIN_MEMORY_MIB)
        le=1_048_576,
        description="Guest memory in MiB; null uses the server default (512).",
    )
    timeout_s: int | None = Field(
        default=None,
        ge=1,
        le=MAX_TIMEOUT_S,
        description="Seconds until the sandbox is killed; null uses the server default (300).",
    )
    metadata: Metadata = Field(default_factory=dict, description="Labels to filter lists by.")
    env: Env = Field(default_factory=dict, description="Environment of every command run.")
    snapshot_id: ObjectId | None = Field(
        default=None,
        description=(
            "Fork from this snapshot instead of booting: the sandbox gets the snapshot's "
            "image, vcpus and memory_mib (giving different ones is a 409 SnapshotMismatch)."
        ),
    )
    network: NetworkRequest | None = Field(
        default=None,
        description="Null (the default): no network at all. Its address is `ip_address`.",
    )


class SandboxPublic(_Public):
    """A sandbox as the server describes it."""

    id: str
    state: SandboxStateName
    image: str
    vcpus: int
    memory_mib: int
    timeout_s: int = Field(description="Lifetime in seconds, counted from the last update.")
    created_at: datetime
    expires_at: datetime
    ip_address: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    error: str | None = Field(default=None, description="Why the sandbox is in state `error`.")
    snapshot_id: str | None = Field(default=None, description="The snapshot it was forked from.")

    @classmethod
    def from_record(cls, record: SandboxRecord) -> SandboxPublic:
        """The public view of a service record (drops env, pid and work dir)."""
        return cls(
            id=record.id,
            state=record.state.value,
            image=record.image,
            vcpus=record.vcpus,
            memory_mib=record.memory_mib,
            timeout_s=record.timeout_s,
            created_at=record.created_at,
            expires_at=record.expires_at,
            ip_address=record.ip_address,
            metadata=dict(record.metadata),
            error=record.error,
            snapshot_id=record.snapshot_id,
        )


class SandboxList(_Public):
    sandboxes: list[SandboxPublic]


# --- snapshots ---------------------------------------------------------------------------


class SnapshotPublic(_Public):
    """A snapshot (memory and disk) of a sandbox; new sandboxes can be forked from it."""

    id: str
    sandbox_id: str = Field(description="The sandbox it was taken of (may since have stopped).")
    image: str
    vcpus: int
    memory_mib: int
    size_bytes: int = Field(description="Disk space the snapshot's files take on the server.")
    created_at: datetime

    @classmethod
    def from_record(cls, record: SnapshotRecord) -> SnapshotPublic:
        """The public view of a service record (drops the host path and the VMM)."""
        return cls(
            id=record.id,
            sandbox_id=record.sandbox_id,
            image=record.image,
            vcpus=record.vcpus,
            memory_mib=record.memory_mib,
            size_bytes=record.size_bytes,
            created_at=record.created_at,
        )


class SnapshotList(_Public):
    snapshots: list[SnapshotPublic]


class TimeoutUpdate(_Request):
    """Give a sandbox a new lifetime, counted from now."""

    timeout_s: int = Field(ge=1, le=MAX_TIMEOUT_S, description="Seconds from now.")


# --- commands ----------------------------------------------------------------------------

ShellCommand = Annotated[str, StringConstraints(min_length=1)]
Argv = Annotated[list[str], Field(min_length=1)]


class ExecRequest(_Request):
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
    stdin: str | None = Field(default=None, description="Text fed to the command (UTF-8).")
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
        return _checked_cmd(cmd)


def _checked_cmd(cmd: list[str] | str) -> list[str] | str:
    parts = [cmd] if isinstance(cmd, str) else cmd
    if any("\x00" in part for part in parts):
        raise ValueError("must not contain NUL characters")
    if not parts[0].strip():
        raise ValueError("the command (first element) must not be blank")
    return cmd


class ExecResponse(_Public):
    """What a finished command left. Output is UTF-8 decoded, invalid bytes replaced."""

    exit_code: int
    stdout: str
    stderr: str
    duration_ms: float
    timed_out: bool = False
    output_truncated: bool = False
    signal: int | None = Field(default=None, description="Signal that ended the command.")

    @classmethod
    def from_result(cls, result: ExecResult) -> ExecResponse:
        return cls(
            exit_code=result.exit_code,
            stdout=result.stdout.decode("utf-8", errors="replace"),
            stderr=result.stderr.decode("utf-8", errors="replace"),
            duration_ms=result.duration_ms if math.isfinite(result.duration_ms) else 0.0,
            timed_out=result.timed_out,
            output_truncated=result.output_truncated,
            signal=result.signal,
        )


# --- the seed's two endpoints (compatibility) --------------------------------------------


class VMCreate(_Request):
    """``POST /vm/create`` of the original FastAPI service."""

    name: Annotated[str, StringConstraints(max_length=1024)]
    user_id: Annotated[str, StringConstraints(max_length=1024)]
    root_image_path: HostPath | None = Field(
        default=None, description="Must be the rootfs of a registered image."
    )
    kernel_path: HostPath | None = Field(
        default=None, description="Must be the kernel (bzImage or vmlinux) of the same image."
    )


class VMCreateResponse(_Public):
    ip_address: str | None
    vm_id: str


class CommandRequest(_Request):
    """``POST /exec/command``: a shell command line."""

    vm_id: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    command: ShellCommand


class CommandResponse(_Public):
    success: bool = Field(description="exit_code == 0")
    output: str = Field(description="stdout followed by stderr")
    exit_code: int


# --- system ------------------------------------------------------------------------------


class ImagePublic(_Public):
    """A registered guest image."""

    name: str
    size_bytes: int
    created_at: datetime
    kernel_release: str | None = None
    default: bool = Field(default=False, description="Used when a request names no image.")

    @classmethod
    def from_info(cls, info: ImageInfo, *, default_name: str) -> ImagePublic:
        kernel = info.manifest.get("kernel")
        release = kernel.get("release") if isinstance(kernel, dict) else None
        return cls(
            name=info.name,
            size_bytes=info.size_bytes,
            created_at=info.created_at,
            kernel_release=release if isinstance(release, str) else None,
            default=info.name == default_name,
        )


class Health(_Public):
    status: Literal["ok"] = "ok"
    version: str
    sandboxes: int = Field(description="Live sandboxes (creating or running).")


class ErrorDetail(_Public):
    type: str = Field(description="Class name in emberbox.errors, or ValidationError.")
    message: str
    image: str | None = Field(default=None, description="ImageNotFound: the name asked for.")
    available: list[str] | None = Field(default=None, description="ImageNotFound: known images.")
    console_tail: str | None = Field(default=None, description="VMMError: last console lines.")
    quota: str | None = Field(default=None, description="QuotaExceeded: the quota's name.")
    limit: int | None = Field(default=None, description="QuotaExceeded: the quota's value.")
    used: int | None = Field(default=None, description="QuotaExceeded: what is held now.")


class ErrorBody(_Public):
    """Every error response: ``{"error": {"type": ..., "message": ...}}``."""

    error: ErrorDetail


# --- streamed output (NDJSON: one event per line) ----------------------------------------


class OutputEvent(_Public):
    """A chunk of output. ``data`` is UTF-8 text; when the chunk's bytes are not valid
    UTF-8, ``data`` has them with U+FFFD replacements and ``data_b64`` has them exactly.
    (A character split between chunks is never split between events.)"""

    type: Literal["stdout", "stderr"]
    data: str
    data_b64: str | None = Field(default=None, description="The exact bytes (base64).")

    @classmethod
    def from_bytes(cls, stream: Literal["stdout", "stderr"], chunk: bytes) -> OutputEvent:
        try:
            return cls(type=stream, data=chunk.decode("utf-8"))
        except UnicodeDecodeError:
            text = chunk.decode("utf-8", errors="replace")
            return cls(type=stream, data=text, data_b64=base64.b64encode(chunk).decode("ascii"))

    def raw(self) -> bytes:
        """The chunk's bytes as the command wrote them."""
        if self.data_b64 is not None:
            return base64.b64decode(self.data_b64)
        return self.data.encode("utf-8")


class ExitEvent(_Public):
    """The last event of a stream: how the command or process ended."""

    type: Literal["exit"] = "exit"
    exit_code: int | None = Field(description="null when a signal ended it (see `signal`).")
    signal: int | None = None
    duration_ms: float | None = None
    timed_out: bool = False
    output_truncated: bool = False
    memory_limited: bool = False


class ErrorEvent(_Public):
    """The last event of a stream that failed after it began (the HTTP status was 200)."""

    type: Literal["error"] = "error"
    error: ErrorDetail


StreamEvent = Annotated[OutputEvent | ExitEvent | ErrorEvent, Field(discriminator="type")]


# --- background processes ----------------------------------------------------------------


class PtySize(_Request):
    """A terminal's size in character cells."""

    cols: int = Field(ge=1, le=1000)
    rows: int = Field(ge=1, le=1000)


class ProcessCreate(_Request):
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
        return _checked_cmd(cmd)


class ProcessStarted(_Public):
    pid: int = Field(description="The process id in the guest.")


class ProcessPublic(_Public):
    """A process started with ``POST .../processes`` (running or ended)."""

    pid: int
    cmd: str
    running: bool
    exit_code: int | None = None
    pty: bool = False
    started_at: float | None = Field(default=None, description="Unix time, guest clock.")

    @classmethod
    def from_info(cls, info: ProcessInfo) -> ProcessPublic:
        cmd = info.cmd if isinstance(info.cmd, str) else shlex.join(info.cmd)
        return cls(
            pid=info.pid,
            cmd=cmd,
            running=info.running,
            exit_code=info.exit_code,
            pty=info.pty,
            started_at=info.started_at,
        )


class ProcessList(_Public):
    processes: list[ProcessPublic]


class ProcessStatusPublic(_Public):
    """Whether a process still runs and, once it ended, how."""

    pid: int
    running: bool
    exit_code: int | None = None
    signal: int | None = None
    duration_ms: float | None = None
    timed_out: bool = False
    output_truncated: bool = False
    memory_limited: bool = False

    @classmethod
    def from_status(cls, status: ProcessStatus) -> ProcessStatusPublic:
        return cls(
            pid=status.pid,
            running=status.running,
            exit_code=status.exit_code,
            signal=status.signal,
            duration_ms=status.duration_ms,
            timed_out=status.timed_out,
            output_truncated=status.output_truncated,
            memory_limited=status.memory_limited,
        )

    def exit_event(self) -> ExitEvent:
        fields = self.model_dump(exclude={"pid", "running"})
        return ExitEvent(**fields)


class SignalRequest(_Request):
    """Send a signal: a name (``TERM``, ``SIGKILL``) or a number."""

    signal: (
        Annotated[str, StringConstraints(pattern=r"^(SIG)?[A-Z][A-Z0-9+-]{0,15}$")]
        | Annotated[int, Field(ge=1, le=64)]
    ) = "TERM"
    group: bool = Field(default=True, description="Signal its whole process group.")


class StdinWritten(_Public):
    written: int = Field(description="Bytes delivered to the process's stdin.")


# --- files -------------------------------------------------------------------------------

FileType = Literal["file", "dir", "symlink", "other"]
_FILE_TYPES: dict[str, FileType] = {"file": "file", "dir": "dir", "symlink": "symlink"}


class FileEntry(_Public):
    """A file in the guest, as the guest's own ``lstat`` sees it."""

    name: str
    path: str
    type: FileType
    size: int
    mode: int = Field(description="Permission bits (st_mode & 0o7777).")
    mtime: float = Field(description="Unix time, guest clock.")

    @classmethod
    def from_info(cls, info: FileInfo) -> FileEntry:
        return cls(
            name=info.name,
            path=info.path,
            type=_FILE_TYPES.get(info.type, "other"),
            size=info.size,
            mode=info.mode & 0o7777,
            mtime=info.mtime,
        )


class FileList(_Public):
    path: str
    entries: list[FileEntry]


class MakeDir(_Request):
    path: GuestPath
    parents: bool = Field(default=True, description="Create missing parents too (mkdir -p).")
    mode: int = Field(default=0o755, ge=0, le=0o7777)


class FileWritten(_Public):
    path: str
    size: int = Field(description="Bytes written.")


class ArchiveWritten(_Public):
    path: str
    entries: int = Field(description="Members extracted.")


# --- audit log (GET /v1/audit, admin keys only) --------------------------------------------


class AuditEntryPublic(_Public):
    """Who (tenant, key) did what to which object, when, and how it ended."""

    id: int
    at: datetime
    tenant: str = Field(description="The caller's tenant name (its id if unknown)")
    key_id: str | None = Field(description="The key used; null in local mode")
    action: str = Field(description="e.g. sandbox.create, sandbox.exec, key.revoke")
    target_id: str | None = Field(description="The sandbox, snapshot or key acted on")
    detail: dict[str, object]
    outcome: str = Field(description="`ok`, or the error's type (NotFound, QuotaExceeded ...)")


class AuditList(_Public):
    entries: list[AuditEntryPublic]


__all__ = [
    "ArchiveWritten",
    "AuditEntryPublic",
    "AuditList",
    "CommandRequest",
    "CommandResponse",
    "ErrorBody",
    "ErrorDetail",
    "ErrorEvent",
    "ExecRequest",
    "ExecResponse",
    "ExitEvent",
    "FileEntry",
    "FileList",
    "FileWritten",
    "Health",
    "ImagePublic",
    "MakeDir",
    "NetworkRequest",
    "OutputEvent",
    "ProcessCreate",
    "ProcessList",
    "ProcessPublic",
    "ProcessStarted",
    "ProcessStatusPublic",
    "PtySize",
    "SandboxCreate",
    "SandboxList",
    "SandboxPublic",
    "SandboxStateName",
    "SignalRequest",
    "SnapshotList",
    "SnapshotPublic",
    "StdinWritten",
    "StreamEvent",
    "TimeoutUpdate",
    "VMCreate",
    "VMCreateResponse",
]
