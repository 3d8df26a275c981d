"""The host's typed view of the agent's answers (re-exported by ``emberbox.agent_client.client``).

Each ``*_from`` function turns one answer dict into its dataclass and raises
:class:`~emberbox.errors.ProtocolError` when the agent sent something malformed.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

from emberbox import errors

FileType = Literal["file", "dir", "symlink", "other"]
FILE_TYPES = ("file", "dir", "symlink", "other")
T = TypeVar("T")


@dataclass(frozen=True)
class ExecResult:
    """What a finished command left: exit code, its output and how long it ran."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    duration_ms: float
    timed_out: bool = False
    output_truncated: bool = False
    signal: int | None = None
    memory_limited: bool = False  # the cgroup's OOM killer struck (limits.memory_mib)
    peak_memory_kib: int | None = None  # the cgroup's peak; None without limits


@dataclass(frozen=True)
class ExecLimits:
    """cgroup v2 limits for one command: memory (MiB, no swap) and process count."""

    memory_mib: int | None = None
    pids: int | None = None

    def wire(self) -> dict[str, Any]:
        return {"memory_mib": self.memory_mib, "pids": self.pids}


@dataclass(frozen=True)
class HelloInfo:
    """The agent's answer to the handshake."""

    protocol: int
    agent_version: str
    boot_time: float
    kernel: str
    warnings: tuple[str, ...] = ()  # what the agent could not do (clock, entropy, ...)
    features: frozenset[str] = frozenset()  # protocol.FEATURES the agent offers


@dataclass(frozen=True)
class ProcessStatus:
    """Whether a spawned process still runs and, once it ended, how."""

    pid: int
    running: bool
    exit_code: int | None  # 128+N when killed by signal N, as for exec; None while running
    signal: int | None
    duration_ms: float | None
    timed_out: bool
    output_truncated: bool  # its output buffer dropped the oldest bytes
    memory_limited: bool


@dataclass(frozen=True)
class ProcessInfo:
    """A spawned process as `ps` lists it."""

    pid: int
    cmd: str
    running: bool
    exit_code: int | None
    pty: bool
    started_at: float  # Unix time, guest clock


@dataclass(frozen=True)
class FileInfo:
    """A file in the guest as its lstat sees it; ``mode`` is the permission bits."""

    name: str
    path: str
    type: FileType
    size: int
    mode: int
    mtime: float  # Unix time, guest clock


def parsed(what: str, answer: dict[str, Any], build: Callable[[], T]) -> T:
    """`build()`, with a malformed answer (missing or mistyped fields) a ProtocolError."""
    try:
        return build()
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise errors.ProtocolError(f"malformed {what} answer {answer!r}") from exc


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def exec_result_from(answer: dict[str, Any], stdout: bytes, stderr: bytes) -> ExecResult:
    return parsed(
        "exec",
        answer,
        lambda: ExecResult(
            exit_code=int(answer["exit_code"]),
            stdout=stdout,
            stderr=stderr,
            duration_ms=float(answer["duration_ms"]),
            timed_out=bool(answer.get("timed_out", False)),
            output_truncated=bool(answer.get("output_truncated", False)),
            signal=_opt_int(answer.get("signal")),
            memory_limited=bool(answer.get("memory_limited", False)),
            peak_memory_kib=_opt_int(answer.get("peak_memory_kib")),
        ),
    )


def hello_info_from(answer: dict[str, Any]) -> HelloInfo:
    return parsed(
        "hello",
        answer,
        lambda: HelloInfo(
            protocol=int(answer["protocol"]),
            agent_version=str(answer["agent_version"]),
            boot_time=float(answer["boot_time"]),
            kernel=str(answer["kernel"]),
            warnings=tuple(str(w) for w in answer.get("warnings") or ()),
            features=frozenset(str(f) for f in answer.get("features") or ()),
        ),
    )


def process_status_from(answer: dict[str, Any]) -> ProcessStatus:
    duration = answer.get("duration_ms")
    return parsed(
        "process status",
        answer,
        lambda: ProcessStatus(
            pid=int(answer["pid"]),
            running=bool(answer["running"]),
            exit_code=_opt_int(answer.get("exit_code")),
            signal=_opt_int(answer.get("signal")),
            duration_ms=None if duration is None else float(duration),
            timed_out=bool(answer.get("timed_out", False)),
            output_truncated=bool(answer.get("output_truncated", False)),
            memory_limited=bool(answer.get("memory_limited", False)),
        ),
    )


def spawned_pid(event: dict[str, Any]) -> int:
    """The pid of a ``spawned`` event (FEATURE_SPAWN_ATTACH)."""
    if event.get("event") != "spawned":
        raise errors.ProtocolError(f"expected a spawned event, got {event!r}")
    return parsed("spawned event", event, lambda: int(event["pid"]))


def process_infos_from(answer: dict[str, Any]) -> list[ProcessInfo]:
    return parsed(
        "ps",
        answer,
        lambda: [
            ProcessInfo(
                pid=int(p["pid"]),
                cmd=str(p["cmd"]),
                running=bool(p["running"]),
                exit_code=_opt_int(p.get("exit_code")),
                pty=bool(p.get("pty", False)),
                started_at=float(p["started_at"]),
            )
            for p in answer["processes"]
        ],
    )


def file_info_from(path: str, entry: dict[str, Any], name: str | None = None) -> FileInfo:
    """One stat answer or list entry; `path` is the file's path as the caller named it."""

    def build() -> FileInfo:
        kind = entry["type"]
        if kind not in FILE_TYPES:
            raise ValueError(f"unknown file type {kind!r}")
        return FileInfo(
            name=name if name is not None else posixpath.basename(path.rstrip("/")) or "/",
            path=path,
            type=cast(FileType, kind),
            size=int(entry["size"]),
            mode=int(entry["mode"]),
            mtime=float(entry["mtime"]),
        )

    return parsed("file", entry, build)


def file_infos_from(directory: str, answer: dict[str, Any]) -> list[FileInfo]:
    entries = parsed("list", answer, lambda: list(answer["entries"]))
    return [
        file_info_from(posixpath.join(directory, str(e.get("name"))), e, str(e.get("name")))
        for e in entries
    ]
