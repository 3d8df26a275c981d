"""One-shot runs (``POST /v1/run``): a program compiled and run once in a fresh sandbox.

A run takes five steps:

1. Create a sandbox of ``Settings.run_image``; the manager restores its template.
2. Write the source and the extra files into ``/tmp/run`` (one tar, ``manager.files``).
3. For compiled languages, compile within ``run_compile_timeout_s``. A non-zero exit or a
   timeout is ``compile_error``.
4. Run the program with the caller's stdin and args, a timeout, and memory and process
   limits. The limits are a cgroup in the guest (``limits`` in docs/protocol.md).

The compiler and the program run as ``nobody`` (``RUN_AS``), in ``/tmp/run``.
5. Kill the sandbox, whatever happened.

The status is the first of these that matches: ``memory_limit``, ``output_limit``,
``timeout``, ``runtime_error``, ``ok`` (see :func:`classify`).
"""

from __future__ import annotations

import enum
import io
import logging
import math
import re
import shlex
import signal
import tarfile
import time
from collections.abc import AsyncIterable, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import anyio
import anyio.to_thread

from emberbox import errors
from emberbox.config import Settings
from emberbox.guest.client import ExecLimits, ExecResult

log = logging.getLogger(__name__)

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
_VERSION = re.compile(r"\d+(?:\.\d+)+")
# How near its memory limit a SIGKILLed program must have been to count as memory_limit
# when the agent cannot tell (no cgroup events).
MEMORY_NEAR_CAP = 0.9


@dataclass(frozen=True)
class Language:
    """How one language is compiled and run, inside ``WORK_DIR``."""

    name: str
    version_cmd: tuple[str, ...]
    source_file: str
    compile_argv: tuple[str, ...] | None
    run_argv: tuple[str, ...]

    @property
    def compiled(self) -> bool:
        return self.compile_argv is not None


LANGUAGES: dict[str, Language] = {
    lang.name: lang
    for lang in (
        Language("python3", ("python3", "--version"), "main.py", None, ("python3", "main.py")),
        Language("bash", ("bash", "--version"), "main.sh", None, ("bash", "main.sh")),
        Language("node", ("node", "--version"), "main.js", None, ("node", "main.js")),
        Language(
            "c",
            ("gcc", "--version"),
            "main.c",
            ("gcc", "-O2", "-std=gnu17", "-o", "main", "main.c", "-lm"),
            ("./main",),
        ),
        Language(
            "c++",
            ("g++", "--version"),
            "main.cpp",
            ("g++", "-O2", "-std=gnu++17", "-o", "main", "main.cpp"),
            ("./main",),
        ),
    )
}


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


class _Record(Protocol):
    @property
    def id(self) -> str: ...


class RunFiles(Protocol):
    """``SandboxManager.files``: the part a run uses."""

    async def tar_in(
        self, sandbox_id: str, path: str, data: AsyncIterable[bytes], *, size: int | None = None
    ) -> int: ...


class RunManager(Protocol):
    """What a run needs of :class:`~emberbox.service.manager.SandboxManager`."""

    @property
    def files(self) -> RunFiles: ...

    async def create(
        self,
        *,
        image: str | None = None,
        memory_mib: int | None = None,
        timeout_s: int | None = None,
        metadata: dict[str, str] | None = None,
        tenant_id: str = ...,
    ) -> _Record: ...

    async def exec(
        self,
        sandbox_id: str,
        cmd: list[str] | str,
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout_s: float | None = None,
        stdin: bytes | None = None,
        limits: ExecLimits | None = None,
    ) -> ExecResult: ...

    async def kill(self, sandbox_id: str) -> None: ...


# -- pure parts ---------------------------------------------------------------------------


def find_language(name: str) -> Language:
    """The language called ``name``; InvalidRequest listing the languages otherwise."""
    language = LANGUAGES.get(name)
    if language is None:
        raise errors.InvalidRequest(
            f"unknown language {name!r}; languages: {', '.join(LANGUAGES)}", field="language"
        )
    return language


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


def versions_command() -> str:
    """One shell line printing ``name=<first line of its version command>`` per language."""
    return "; ".join(
        f'echo {shlex.quote(lang.name)}="$({shlex.join(lang.version_cmd)} 2>&1 | head -n 1)"'
        for lang in LANGUAGES.values()
    )


def parse_versions(output: str) -> dict[str, str | None]:
    """``{language: "3.11.2"}`` from :func:`versions_command`'s output (None: not found)."""
    found: dict[str, str | None] = dict.fromkeys(LANGUAGES)
    for line in output.splitlines():
        name, _, text = line.partition("=")
        match = _VERSION.search(text)
        if name in found and match:
            found[name] = match.group(0)
    return found


# -- running ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """A checked :class:`RunSpec` with its defaults applied."""

    language: Language
    files: Mapping[str, bytes]
    stdin: bytes
    args: list[str]
    timeout_s: float
    memory_mib: int  # the program's limit
    vm_memory_mib: int  # the sandbox's


def plan_run(settings: Settings, spec: RunSpec) -> _Plan:
    """Check ``spec`` against the settings; InvalidRequest names the faulty field."""
    language = find_language(spec.language)
    timeout_s, memory_mib = run_limits(settings, spec)
    if any("\0" in arg for arg in spec.args):
        raise errors.InvalidRequest("args must not contain NUL characters", field="args")
    return _Plan(
        language=language,
        files=program_files(language, spec.code, spec.files),
        stdin=spec.stdin.encode("utf-8"),
        args=list(spec.args),
        timeout_s=timeout_s,
        memory_mib=memory_mib,
        vm_memory_mib=vm_memory_mib(settings, memory_mib),
    )


async def run_code(manager: RunManager, settings: Settings, spec: RunSpec) -> RunResult:
    """Compile and run ``spec`` in a fresh sandbox of ``settings.run_image``, then kill it.

    Raises InvalidRequest (unknown language, bad file names, limits) before anything
    starts, HostError when the server has no run image, and the manager's errors
    (QuotaExceeded, VMMError ...) when no sandbox can be had.
    """
    plan = plan_run(settings, spec)
    lifetime = math.ceil(settings.run_compile_timeout_s + plan.timeout_s) + LIFETIME_MARGIN_S
    owner = {} if spec.tenant_id is None else {"tenant_id": spec.tenant_id}
    try:
        record = await manager.create(
            image=settings.run_image,
            memory_mib=plan.vm_memory_mib,
            timeout_s=min(lifetime, settings.max_timeout_s),
            metadata={"purpose": "run", "language": plan.language.name},
            **owner,
        )
    except errors.ImageNotFound as exc:
        raise errors.HostError(
            f"this server has no image {settings.run_image!r} for runs: build it with "
            f"`emberbox image build --name {settings.run_image}`"
        ) from exc
    try:
        return await _compile_and_run(manager, settings, record.id, plan)
    finally:
        with anyio.CancelScope(shield=True):
            try:
                await manager.kill(record.id)
            except errors.EmberboxError:
                log.exception("run: killing sandbox %s failed", record.id)


async def _compile_and_run(
    manager: RunManager, settings: Settings, sandbox_id: str, plan: _Plan
) -> RunResult:
    cap = settings.run_output_max_bytes
    tar = await anyio.to_thread.run_sync(pack_files, plan.files)
    await manager.files.tar_in(sandbox_id, WORK_PARENT, _once(tar), size=len(tar))
    compile_output = b""
    if plan.language.compile_argv is not None:
        built = await _exec(
            manager,
            sandbox_id,
            [*RUN_AS, *plan.language.compile_argv],
            settings.run_compile_timeout_s,
            limits=ExecLimits(memory_mib=plan.vm_memory_mib - AGENT_RESERVE_MIB, pids=PIDS_MAX),
        )
        compile_output, _ = clip(built.stdout + built.stderr, cap)
        compile_output += _compiler_stopped(built, settings.run_compile_timeout_s)
        if built.timed_out or built.memory_limited or built.exit_code != 0:
            return RunResult(RunStatus.COMPILE_ERROR, compile_output=compile_output)
    ran = await _exec(
        manager,
        sandbox_id,
        [*RUN_AS, *plan.language.run_argv, *plan.args],
        plan.timeout_s,
        stdin=plan.stdin,
        limits=ExecLimits(memory_mib=plan.memory_mib, pids=PIDS_MAX),
    )
    stdout, stdout_over = clip(ran.stdout, cap)
    stderr, stderr_over = clip(ran.stderr, cap)
    return RunResult(
        status=classify(ran, plan.memory_mib * 1024, stdout_over or stderr_over),
        exit_code=ran.exit_code,
        signal=ran.signal,
        stdout=stdout,
        stderr=stderr,
        compile_output=compile_output,
        time_ms=ran.duration_ms if math.isfinite(ran.duration_ms) else None,
        memory_kib=ran.peak_memory_kib,
    )


def _compiler_stopped(built: ExecResult, timeout_s: float) -> bytes:
    """What the compile output gets when emberbox, not the compiler, ended it."""
    if built.timed_out:
        return f"\nemberbox: compilation timed out after {timeout_s:g} s\n".encode()
    if built.memory_limited:
        return b"\nemberbox: the compiler ran out of memory\n"
    return b""


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _exec(
    manager: RunManager,
    sandbox_id: str,
    argv: list[str],
    timeout_s: float,
    *,
    stdin: bytes | None = None,
    limits: ExecLimits | None = None,
) -> ExecResult:
    """``manager.exec`` in ``WORK_DIR``; an agent that outlived the timeout counts as a
    timed-out command (with whatever output came)."""
    try:
        return await manager.exec(
            sandbox_id,
            argv,
            env=RUN_ENV,
            cwd=WORK_DIR,
            timeout_s=timeout_s,
            stdin=stdin,
            limits=limits,
        )
    except errors.ExecTimeout as exc:
        if isinstance(exc.result, ExecResult):
            return replace(exc.result, timed_out=True)
        killed = 128 + signal.SIGKILL
        return ExecResult(killed, b"", b"", timeout_s * 1000, timed_out=True, signal=signal.SIGKILL)


# -- languages ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LanguageInfo:
    """A language as ``GET /v1/languages`` lists it."""

    name: str
    version: str | None
    source_file: str
    compiled: bool


class ImageHashes(Protocol):
    """``ImageRegistry.get``: an image's info (its ``image_hash`` names the build)."""

    def get(self, name: str) -> object: ...


class LanguageVersions:
    """The run image's language versions, found once per image build (one sandbox)."""

    def __init__(self) -> None:
        self._found: dict[str, dict[str, str | None]] = {}
        self._lock = anyio.Lock()

    async def languages(
        self, manager: RunManager, settings: Settings, images: ImageHashes
    ) -> list[LanguageInfo]:
        """Every language with its version (None when it cannot be found out now)."""
        versions = await self._versions(manager, settings, images)
        return [
            LanguageInfo(lang.name, versions.get(lang.name), lang.source_file, lang.compiled)
            for lang in LANGUAGES.values()
        ]

    async def _versions(
        self, manager: RunManager, settings: Settings, images: ImageHashes
    ) -> dict[str, str | None]:
        try:
            info = await anyio.to_thread.run_sync(images.get, settings.run_image)
        except errors.ImageNotFound:
            return {}
        key = f"{settings.run_image}/{getattr(info, 'image_hash', '')}"
        async with self._lock:
            if key not in self._found:
                try:
                    self._found[key] = await _ask_versions(manager, settings)
                except errors.EmberboxError as exc:
                    log.warning("languages: cannot find out the versions: %s", exc.message)
                    return {}
            return self._found[key]


async def _ask_versions(manager: RunManager, settings: Settings) -> dict[str, str | None]:
    record = await manager.create(image=settings.run_image, metadata={"purpose": "languages"})
    try:
        result = await manager.exec(record.id, versions_command(), timeout_s=60)
    finally:
        with anyio.CancelScope(shield=True):
            await manager.kill(record.id)
    return parse_versions(result.stdout.decode("utf-8", "replace"))


__all__ = [
    "LANGUAGES",
    "Language",
    "LanguageInfo",
    "LanguageVersions",
    "RunManager",
    "RunResult",
    "RunSpec",
    "RunStatus",
    "classify",
    "run_code",
]
