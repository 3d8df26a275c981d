"""A one-shot run's plan, and how its result is judged: the checked :class:`RunSpec`
with its defaults applied, the program's files as one tar, the guest's memory, and
:func:`classify`. Pure functions, unit-tested without a VM; :mod:`emberbox.service.oneshot.runner`
carries the plan out."""

from __future__ import annotations

import enum
import io
import re
import signal
import tarfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from emberbox import errors
from emberbox.agent_client.client import ExecResult
from emberbox.config import Settings
from emberbox.service.oneshot.languages import Language, find_language

WORK_PARENT, WORK_NAME = "/tmp", "run"
WORK_DIR = f"{WORK_PARENT}/{WORK_NAME}"
NOBODY = 65534  # nobody:nogroup in Debian
# The compiler and the program run as nobody, without a way back to root (no setuid):
# root in the guest could kill the agent or raise its own cgroup's limits.
RUN_AS = (
    "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--no-new-privs", "--",
)  # fmt: skip
RUN_ENV = {"HOME": WORK_DIR}
PIDS_MAX = 256  # processes and threads of the program (node alone starts ~10 threads)
# What the guest needs beside the program's own memory limit: kernel, agent, page cache,
# and room for the compiler (cc1plus alone takes ~100 MiB for <iostream>).
VM_OVERHEAD_MIB = 256
AGENT_RESERVE_MIB = 128  # what the compiler leaves to the kernel and the agent
LIFETIME_MARGIN_S = 60  # the sandbox outlives compile + run by this much, then the reaper
MAX_FILES = 64
FILE_NAME_MAX = 255
_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]*$")
# How near its memory limit a SIGKILLed program must have been to count as memory_limit
# when the agent cannot tell (no cgroup events).
MEMORY_NEAR_CAP = 0.9


class RunStatus(enum.StrEnum):
    OK = "ok"
    RUNTIME_ERROR = "runtime_error"
    COMPILE_ERROR = "compile_error"
    TIMEOUT = "timeout"
    MEMORY_LIMIT = "memory_limit"
    OUTPUT_LIMIT = "output_limit"


@dataclass(frozen=True)
class RunSpec:
    """What to run. ``None`` timeout and memory take the ``Settings.run_*`` defaults."""

    language: str
    code: str
    files: Sequence[tuple[str, str]] = ()  # (relative name, content)
    stdin: str = ""
    args: Sequence[str] = ()
    timeout_s: float | None = None
    memory_mib: int | None = None
    tenant_id: str | None = None  # the caller's tenant (its quotas count the run's sandbox)


@dataclass(frozen=True)
class RunResult:
    """How a run ended. ``time_ms`` and ``memory_kib`` are the run step's (not the
    compiler's); ``exit_code`` is None when the program never ran."""

    status: RunStatus
    exit_code: int | None = None
    signal: int | None = None
    stdout: bytes = b""
    stderr: bytes = b""
    compile_output: bytes = b""
    time_ms: float | None = None
    memory_kib: int | None = None
    warm: bool = False  # the program was forked from the guest's warm runtime


def check_file_name(name: str) -> None:
    """A relative path of plain components (no ``..``, no leading ``/``, no oddities)."""
    parts = name.split("/")
    if len(name) > FILE_NAME_MAX or not all(_PART.match(p) and p != ".." for p in parts):
        raise errors.InvalidRequest(
            f"bad file name {name!r}: use a relative path of letters, digits, '.', '_', "
            f"'+' and '-' (at most {FILE_NAME_MAX} characters, no '..')",
            field="files",
        )


def program_files(
    language: Language, code: str, files: Sequence[tuple[str, str]]
) -> dict[str, bytes]:
    """Every file the run writes: the extra ``files`` and the source under its own name."""
    if len(files) > MAX_FILES:
        raise errors.InvalidRequest(f"at most {MAX_FILES} files", field="files")
    found: dict[str, bytes] = {}
    for name, content in files:
        check_file_name(name)
        if name in found:
            raise errors.InvalidRequest(f"file {name!r} is given twice", field="files")
        found[name] = content.encode("utf-8")
    own = {language.source_file} | ({"main"} if language.compiled else set())
    if own & found.keys():
        raise errors.InvalidRequest(
            f"the file name {sorted(own & found.keys())[0]!r} is the program's own",
            field="files",
        )
    found[language.source_file] = code.encode("utf-8")
    dirs = {"/".join(n.split("/")[:i]) for n in found for i in range(1, n.count("/") + 1)}
    if dirs & found.keys():
        clash = sorted(dirs & found.keys())[0]
        raise errors.InvalidRequest(f"{clash!r} is both a file and a directory", field="files")
    return found


def pack_files(files: Mapping[str, bytes], top: str = WORK_NAME) -> bytes:
    """A tar of ``files`` under the directory ``top``, to be extracted in ``WORK_PARENT``.

    Everything is writable by all: the guest extracts as root, the program runs as
    nobody, and may change, add or compile anything in its directory.
    """
    dirs = {top}
    for name in files:
        parents = name.split("/")[:-1]
        dirs.update("/".join([top, *parents[:i]]) for i in range(1, len(parents) + 1))
    now = int(time.time())
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory in sorted(dirs):
            info = tarfile.TarInfo(directory)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o777, now
            tar.addfile(info)
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size, info.mode, info.mtime = len(data), 0o666, now
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def vm_memory_mib(settings: Settings, limit_mib: int) -> int:
    """Guest memory for a program limited to ``limit_mib``: the default size, doubled
    until the limit and the guest's overhead fit (few sizes, so few templates)."""
    need = limit_mib + VM_OVERHEAD_MIB
    if need > settings.max_memory_mib:
        top = settings.max_memory_mib - VM_OVERHEAD_MIB
        raise errors.InvalidRequest(f"memory_mib must be at most {top}", field="memory_mib")
    size = settings.default_memory_mib
    while size < need:
        size *= 2
    return min(size, settings.max_memory_mib)


def run_limits(settings: Settings, spec: RunSpec) -> tuple[float, int]:
    """The run step's timeout (s) and memory limit (MiB), defaults applied and checked."""
    timeout_s = settings.run_default_timeout_s if spec.timeout_s is None else spec.timeout_s
    if not 0 < timeout_s <= settings.run_max_timeout_s:
        raise errors.InvalidRequest(
            f"timeout_s must be above 0 and at most {settings.run_max_timeout_s:g}",
            field="timeout_s",
        )
    memory_mib = settings.run_default_memory_mib if spec.memory_mib is None else spec.memory_mib
    if memory_mib < 1:
        raise errors.InvalidRequest("memory_mib must be positive", field="memory_mib")
    return timeout_s, memory_mib


def clip(data: bytes, cap: int) -> tuple[bytes, bool]:
    """At most ``cap`` bytes of ``data``, and whether any were dropped."""
    return data[:cap], len(data) > cap


def classify(result: ExecResult, memory_limit_kib: int, output_over: bool) -> RunStatus:
    """The status of a finished run step (first match wins, see the module docstring).

    ``output_over``: more output than the run's cap. A SIGKILL with the peak memory near
    the limit is ``memory_limit`` too: the kernel's OOM killer, when the agent could not
    see the cgroup's events.
    """
    peak = result.peak_memory_kib
    oom_like = (
        result.signal == signal.SIGKILL
        and not result.timed_out
        and peak is not None
        and peak >= MEMORY_NEAR_CAP * memory_limit_kib
    )
    if result.memory_limited or oom_like:
        return RunStatus.MEMORY_LIMIT
    if output_over or result.output_truncated:
        return RunStatus.OUTPUT_LIMIT
    if result.timed_out:
        return RunStatus.TIMEOUT
    if result.exit_code != 0 or result.signal is not None:
        return RunStatus.RUNTIME_ERROR
    return RunStatus.OK


@dataclass(frozen=True)
class RunPlan:
    """A checked :class:`RunSpec` with its defaults applied."""

    language: Language
    files: Mapping[str, bytes]
    stdin: bytes
    args: list[str]
    timeout_s: float
    memory_mib: int  # the program's limit
    vm_memory_mib: int  # the sandbox's


def plan_run(settings: Settings, spec: RunSpec) -> RunPlan:
    """Check ``spec`` against the settings; InvalidRequest names the faulty field."""
    language = find_language(spec.language)
    timeout_s, memory_mib = run_limits(settings, spec)
    if any("\0" in arg for arg in spec.args):
        raise errors.InvalidRequest("args must not contain NUL characters", field="args")
    return RunPlan(
        language=language,
        files=program_files(language, spec.code, spec.files),
        stdin=spec.stdin.encode("utf-8"),
        args=list(spec.args),
        timeout_s=timeout_s,
        memory_mib=memory_mib,
        vm_memory_mib=vm_memory_mib(settings, memory_mib),
    )
