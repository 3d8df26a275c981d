"""What the sync and async process, file and terminal clients share: the requests, the
NDJSON events of streamed output, the terminal's frames and local tar archives.

All pure: :mod:`emberbox.sdk._sync_guest` and :mod:`emberbox.sdk._async_guest` only
differ in how they send and wait.
"""

from __future__ import annotations

import json
import os
import stat
import tarfile
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlencode

import httpx
import pydantic
import websockets

from emberbox import errors
from emberbox.models import (
    ErrorEvent,
    ExitEvent,
    FileEntry,
    FileList,
    OutputEvent,
    ProcessList,
    ProcessPublic,
    ProcessStatusPublic,
    StreamEvent,
)
from emberbox.sdk._calls import Call, ClientConfig, CommandResult, _quote, error_from_body, parse

#: Called with each chunk of output as text (UTF-8, invalid bytes replaced); in the
#: async client it may also be a coroutine function.
OutputHandler = Callable[[str], object]

FOLLOW_WAIT_S = None  # a background process may stay quiet for as long as it likes
TRANSFER_WAIT_S = 300.0  # between two chunks of a file transfer (a slow guest disk)
CHUNK_SIZE = 1 << 20  # local file reads when uploading
SPOOL_BYTES = 16 << 20  # a directory's tar stays in memory up to this, then on disk
SPAWN_WAIT_S = 60.0


class ProcessInfo(ProcessPublic):
    """A background process: ``pid``, ``cmd``, ``running``, ``exit_code``, ``pty``."""


class ProcessStatus(ProcessStatusPublic):
    """Whether a process runs and, once it ended, ``exit_code``, ``signal``, ..."""


class FileInfo(FileEntry):
    """A file in the sandbox: ``name``, ``path``, ``type``, ``size``, ``mode``, ``mtime``."""


# --- requests ----------------------------------------------------------------------------


def _base(sandbox_id: str) -> str:
    return f"/v1/sandboxes/{_quote(sandbox_id)}"


def _pid(pid: int) -> int:
    if isinstance(pid, bool) or not isinstance(pid, int) or pid < 1:
        raise errors.InvalidRequest(f"not a process id: {pid!r}")
    return pid


def spawn_call(
    sandbox_id: str,
    cmd: list[str] | str,
    env: Mapping[str, str] | None,
    cwd: str | None,
    timeout_s: float | None,
    pty: tuple[int, int] | None = None,
) -> Call:
    body: dict[str, Any] = {"cmd": cmd if isinstance(cmd, str) else list(cmd)}
    if env is not None:
        body["env"] = dict(env)
    if cwd is not None:
        body["cwd"] = cwd
    if timeout_s is not None:
        body["timeout_s"] = timeout_s
    if pty is not None:
        body["pty"] = {"cols": pty[0], "rows": pty[1]}
    return Call("POST", f"{_base(sandbox_id)}/processes", json=body, wait_s=SPAWN_WAIT_S)


def list_processes_call(sandbox_id: str) -> Call:
    return Call("GET", f"{_base(sandbox_id)}/processes")


def process_call(sandbox_id: str, pid: int, method: str = "GET") -> Call:
    return Call(method, f"{_base(sandbox_id)}/processes/{_pid(pid)}")


def output_call(sandbox_id: str, pid: int, *, follow: bool = True, from_start: bool = True) -> Call:
    params = [("follow", _flag(follow)), ("from_start", _flag(from_start))]
    path = f"{_base(sandbox_id)}/processes/{_pid(pid)}/output"
    return Call("GET", path, params=params, wait_s=FOLLOW_WAIT_S)


def stdin_call(sandbox_id: str, pid: int, data: bytes, close: bool) -> Call:
    path = f"{_base(sandbox_id)}/processes/{_pid(pid)}/stdin"
    return Call("POST", path, params=[("close", _flag(close))], content=data)


def signal_call(sandbox_id: str, pid: int, signal: str | int, group: bool = True) -> Call:
    path = f"{_base(sandbox_id)}/processes/{_pid(pid)}/signal"
    return Call("POST", path, json={"signal": signal, "group": group})


def resize_call(sandbox_id: str, pid: int, cols: int, rows: int) -> Call:
    path = f"{_base(sandbox_id)}/processes/{_pid(pid)}/resize"
    return Call("POST", path, json={"cols": cols, "rows": rows})


def read_call(sandbox_id: str, path: str) -> Call:
    """GET a file's bytes or a directory's listing (the answer's type tells which)."""
    return Call(
        "GET", f"{_base(sandbox_id)}/files", params=[("path", path)], wait_s=TRANSFER_WAIT_S
    )


def stat_call(sandbox_id: str, path: str) -> Call:
    return Call("GET", f"{_base(sandbox_id)}/files/stat", params=[("path", path)])


def write_call(
    sandbox_id: str, path: str, content: Any, mode: int | None, size: int | None
) -> Call:
    params = [("path", path)] + ([] if mode is None else [("mode", f"{mode:o}")])
    headers = {"Content-Type": "application/octet-stream"}
    if size is not None:
        headers["Content-Length"] = str(size)
    return Call(
        "PUT",
        f"{_base(sandbox_id)}/files",
        params=params,
        content=content,
        headers=headers,
        wait_s=TRANSFER_WAIT_S,
    )


def remove_call(sandbox_id: str, path: str, recursive: bool) -> Call:
    params = [("path", path), ("recursive", _flag(recursive))]
    return Call("DELETE", f"{_base(sandbox_id)}/files", params=params, wait_s=TRANSFER_WAIT_S)


def mkdir_call(sandbox_id: str, path: str, parents: bool, mode: int) -> Call:
    body = {"path": path, "parents": parents, "mode": mode}
    return Call("POST", f"{_base(sandbox_id)}/files/mkdir", json=body)


def tar_out_call(sandbox_id: str, path: str) -> Call:
    params = [("path", path)]
    return Call("GET", f"{_base(sandbox_id)}/archive", params=params, wait_s=TRANSFER_WAIT_S)


def tar_in_call(sandbox_id: str, path: str, content: Any, size: int) -> Call:
    headers = {"Content-Type": "application/x-tar", "Content-Length": str(size)}
    return Call(
        "PUT",
        f"{_base(sandbox_id)}/archive",
        params=[("path", path)],
        content=content,
        headers=headers,
        wait_s=TRANSFER_WAIT_S,
    )


def _flag(value: bool) -> str:
    return "true" if value else "false"


# --- answers -----------------------------------------------------------------------------


def parse_processes(response: httpx.Response) -> list[ProcessInfo]:
    processes = parse(ProcessList, response).processes
    return [ProcessInfo.model_validate(item.model_dump()) for item in processes]


def parse_listing(content: bytes) -> list[FileInfo]:
    listing = FileList.model_validate_json(content)
    return [FileInfo.model_validate(entry.model_dump()) for entry in listing.entries]


def is_listing(content_type: str) -> bool:
    return content_type.split(";")[0].strip() == "application/json"


_EVENTS: pydantic.TypeAdapter[OutputEvent | ExitEvent | ErrorEvent] = pydantic.TypeAdapter(
    StreamEvent
)


def parse_event(line: str | bytes) -> OutputEvent | ExitEvent | ErrorEvent:
    try:
        return _EVENTS.validate_json(line)
    except pydantic.ValidationError as exc:
        raise errors.EmberboxError(f"unexpected line in an output stream: {line[:200]!r}") from exc


@dataclass
class OutputCollector:
    """Gathers a stream's output; :meth:`feed` says which handler gets which text."""

    on_stdout: OutputHandler | None = None
    on_stderr: OutputHandler | None = None
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    exit: ExitEvent | None = None

    def feed(self, event: OutputEvent | ExitEvent | ErrorEvent) -> tuple[OutputHandler, str] | None:
        if isinstance(event, ErrorEvent):
            raise error_from_body(event.error.model_dump())
        if isinstance(event, ExitEvent):
            self.exit = event
            return None
        if event.type == "stdout":
            self.stdout += event.raw()
            handler = self.on_stdout
        else:
            self.stderr += event.raw()
            handler = self.on_stderr
        return None if handler is None else (handler, event.data)

    def result(self) -> CommandResult:
        if self.exit is None:
            raise errors.AgentDisconnected("the output stream ended before the command did")
        exit_code = self.exit.exit_code
        if exit_code is None:
            exit_code = -self.exit.signal if self.exit.signal else -1
        return CommandResult(
            exit_code=exit_code,
            stdout=self.stdout.decode("utf-8", errors="replace"),
            stderr=self.stderr.decode("utf-8", errors="replace"),
            duration_ms=self.exit.duration_ms or 0.0,
            timed_out=self.exit.timed_out,
            output_truncated=self.exit.output_truncated,
            signal=self.exit.signal,
        )


# --- the terminal ------------------------------------------------------------------------


def pty_url(config: ClientConfig, sandbox_id: str, cols: int, rows: int, cmd: str | None) -> str:
    query: dict[str, Any] = {"cols": cols, "rows": rows}
    if cmd is not None:
        query["cmd"] = cmd
    scheme, rest = config.url.split("://", 1)
    ws = {"http": "ws", "https": "wss"}.get(scheme, scheme)
    return f"{ws}://{rest}{_base(sandbox_id)}/pty?{urlencode(query)}"


def pty_headers(config: ClientConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}


def resize_frame(cols: int, rows: int) -> str:
    return json.dumps({"type": "resize", "cols": cols, "rows": rows})


def control_frame(text: str) -> dict[str, Any]:
    """A JSON text frame from the server: ``started``, ``exit`` or ``error`` (raised)."""
    try:
        message = json.loads(text)
    except ValueError as exc:
        raise errors.EmberboxError(f"unexpected terminal frame {text[:200]!r}") from exc
    if not isinstance(message, dict):
        raise errors.EmberboxError(f"unexpected terminal frame {text[:200]!r}")
    if message.get("type") == "error":
        raise error_from_body(message.get("error") or {})
    return message


def closed_error(exc: websockets.exceptions.ConnectionClosed) -> errors.EmberboxError:
    """Why the terminal closed before its program's exit: the server's error (a close
    code 4000 + its HTTP status) or a lost connection."""
    close = exc.rcvd
    if close is not None and 4000 <= close.code < 5000:
        message = close.reason or f"the terminal closed with code {close.code}"
        return errors.EmberboxError(message, status_code=close.code - 4000)
    return errors.HostError(f"the terminal connection closed: {exc}")


# --- local files and trees ---------------------------------------------------------------


def file_size(data: IO[bytes]) -> int | None:
    """The bytes left to read in ``data`` when it is a regular file, else None."""
    try:
        info = os.fstat(data.fileno())
        position = data.tell()
    except (AttributeError, OSError, ValueError):
        return None
    return info.st_size - position if stat.S_ISREG(info.st_mode) else None


def pack_dir(local_dir: str | os.PathLike[str]) -> tuple[IO[bytes], int]:
    """``local_dir``'s contents as a tar (in memory, on disk past 16 MiB): (file, size)."""
    root = Path(local_dir)
    if not root.is_dir():
        raise errors.InvalidRequest(f"{root} is not a directory")
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 (returned)
    with tarfile.open(fileobj=spool, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for child in sorted(root.iterdir()):
            tar.add(child, arcname=child.name)
    size = spool.tell()
    spool.seek(0)
    return spool, size


def unpack_into(archive: IO[bytes], local_dir: str | os.PathLike[str]) -> int:
    """Extract a tar from the sandbox into ``local_dir`` with tarfile's ``data`` filter:
    nothing outside ``local_dir``, no devices, no links out (the guest is untrusted)."""
    if not hasattr(tarfile, "data_filter"):
        raise errors.HostError("download_dir needs Python 3.11.4 or later (tarfile filters)")
    dest = Path(local_dir)
    dest.mkdir(parents=True, exist_ok=True)
    archive.seek(0)
    with tarfile.open(fileobj=archive, mode="r:") as tar:
        members = tar.getmembers()
        try:
            tar.extractall(dest, filter="data")
        except tarfile.FilterError as exc:
            raise errors.InvalidRequest(
                f"refused a member of the sandbox's archive: {exc}"
            ) from exc
    return len(members)


def spool() -> IO[bytes]:
    return tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
