"""The public view of each service object: what the API answers, built from what the
service returns. The wire models (:mod:`emberbox.models`) know nothing of the server, so
the SDK installs without it; these functions are where server types meet them.

Each view drops what a caller must not see (a sandbox's env, VMM pid and work dir; a
snapshot's host path) and turns bytes into text (invalid UTF-8 replaced).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from emberbox.models import (
    CommandResponse,
    ExecLogEntryPublic,
    ExecResponse,
    ExitEvent,
    FileEntry,
    FileType,
    ImagePublic,
    ProcessPublic,
    ProcessStatusPublic,
    SandboxPublic,
    SnapshotPublic,
)
from emberbox.models.images import ImageDetail, ImageLayer, ImageUsage
from emberbox.models.oneshot import LanguagePublic, RunResponse
from emberbox.service.catalog import display_name
from emberbox.service.sandboxes.reserved import public_metadata

if TYPE_CHECKING:
    from emberbox.agent_client.client import ExecResult, FileInfo, ProcessInfo, ProcessStatus
    from emberbox.service.catalog import ImageInfo
    from emberbox.service.images.registry_service import ImageView
    from emberbox.service.oneshot.runner import LanguageInfo, RunResult
    from emberbox.service.sandboxes.manager import ExecLogEntry, SandboxRecord
    from emberbox.service.snapshots.records import SnapshotRecord

_FILE_TYPES: dict[str, FileType] = {"file": "file", "dir": "dir", "symlink": "symlink"}


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def sandbox_public(record: SandboxRecord) -> SandboxPublic:
    """A sandbox without its env, VMM pid and work dir; the state as its wire name."""
    return SandboxPublic(
        id=record.id,
        state=record.state.value,
        image=display_name(record.image),
        vcpus=record.vcpus,
        memory_mib=record.memory_mib,
        timeout_s=record.timeout_s,
        created_at=record.created_at,
        expires_at=record.expires_at,
        ip_address=record.ip_address,
        metadata=public_metadata(record.metadata),  # never the E2B front's token
        error=record.error,
        snapshot_id=record.snapshot_id,
    )


def snapshot_public(record: SnapshotRecord) -> SnapshotPublic:
    """A snapshot without its host path and the VMM that wrote it."""
    return SnapshotPublic(
        id=record.id,
        sandbox_id=record.sandbox_id,
        image=display_name(record.image),
        vcpus=record.vcpus,
        memory_mib=record.memory_mib,
        size_bytes=record.size_bytes,
        created_at=record.created_at,
    )


def exec_response(result: ExecResult) -> ExecResponse:
    """A finished command; a non-finite duration (a clock oddity) becomes 0."""
    return ExecResponse(
        exit_code=result.exit_code,
        stdout=_text(result.stdout),
        stderr=_text(result.stderr),
        duration_ms=_finite(result.duration_ms) or 0.0,
        timed_out=result.timed_out,
        output_truncated=result.output_truncated,
        signal=result.signal,
    )


def exec_log_entry(entry: ExecLogEntry) -> ExecLogEntryPublic:
    """A row of the exec log; a non-finite duration becomes 0."""
    return ExecLogEntryPublic(
        id=entry.id or 0,
        command=entry.command,
        started_at=entry.started_at,
        duration_ms=_finite(entry.duration_ms) or 0.0,
        exit_code=entry.exit_code,
        timed_out=entry.timed_out,
    )


def exec_exit_event(result: ExecResult) -> ExitEvent:
    """The last event of a streamed exec."""
    return ExitEvent(
        exit_code=result.exit_code,
        signal=result.signal,
        duration_ms=_finite(result.duration_ms) or 0.0,
        timed_out=result.timed_out,
        output_truncated=result.output_truncated,
        memory_limited=result.memory_limited,
    )


def command_response(result: ExecResult) -> CommandResponse:
    """The seed's ``POST /exec/command``: stdout followed by stderr as one text."""
    output = _text(result.stdout + result.stderr)
    return CommandResponse(success=result.exit_code == 0, output=output, exit_code=result.exit_code)


def process_public(info: ProcessInfo) -> ProcessPublic:
    return ProcessPublic(
        pid=info.pid,
        cmd=info.cmd,
        running=info.running,
        exit_code=info.exit_code,
        pty=info.pty,
        started_at=info.started_at,
    )


def process_status_public(status: ProcessStatus) -> ProcessStatusPublic:
    return ProcessStatusPublic(
        pid=status.pid,
        running=status.running,
        exit_code=status.exit_code,
        signal=status.signal,
        duration_ms=status.duration_ms,
        timed_out=status.timed_out,
        output_truncated=status.output_truncated,
        memory_limited=status.memory_limited,
    )


def file_entry(info: FileInfo) -> FileEntry:
    """A file as the guest's lstat saw it; ``mode`` keeps the permission bits only."""
    return FileEntry(
        name=info.name,
        path=info.path,
        type=_FILE_TYPES.get(info.type, "other"),
        size=info.size,
        mode=info.mode & 0o7777,
        mtime=info.mtime,
    )


def image_public(info: ImageInfo, *, default_name: str) -> ImagePublic:
    """A registered image; ``default`` when it is the one a request without one gets."""
    kernel = info.manifest.get("kernel")
    release = kernel.get("release") if isinstance(kernel, dict) else None
    return ImagePublic(
        name=info.name,
        size_bytes=info.size_bytes,
        created_at=info.created_at,
        kernel_release=release if isinstance(release, str) else None,
        default=info.name == default_name,
    )


def image_detail(view: ImageView, *, default_name: str) -> ImageDetail:
    """A registered image with its config, layers and what uses it (no host paths)."""
    info, config = view.info, view.info.config
    public = image_public(info, default_name=default_name)
    layers = []
    for layer in info.layers:
        size = layer.get("size")
        layers.append(
            ImageLayer(
                digest=str(layer.get("digest", "")),
                size=size if isinstance(size, int) and size >= 0 else 0,
                step=str(layer.get("step", "")),
            )
        )
    return ImageDetail(
        name=info.name,
        shared=view.shared,
        size_bytes=info.size_bytes,
        created_at=info.created_at,
        base=info.base,
        created_by=info.created_by,
        image_hash=info.image_hash,
        layers=layers,
        env=config.env,
        workdir=config.workdir,
        user=config.user,
        labels=config.labels,
        cmd=config.cmd,
        userland=config.userland,
        kernel_release=public.kernel_release,
        default=public.default and view.shared,
        usage=ImageUsage(
            sandboxes=list(view.usage.sandboxes), snapshots=list(view.usage.snapshots)
        ),
    )


def run_response(result: RunResult) -> RunResponse:
    """How a one-shot run ended; a non-finite time becomes null."""
    return RunResponse(
        status=result.status.value,
        exit_code=result.exit_code,
        signal=result.signal,
        stdout=_text(result.stdout),
        stderr=_text(result.stderr),
        compile_output=_text(result.compile_output),
        time_ms=_finite(result.time_ms),
        memory_kib=result.memory_kib,
    )


def language_public(info: LanguageInfo) -> LanguagePublic:
    return LanguagePublic(
        name=info.name,
        version=info.version,
        source_file=info.source_file,
        compiled=info.compiled,
    )
