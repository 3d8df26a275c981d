"""One-shot runs (``POST /v1/run``): a program compiled and run once in a fresh sandbox.

The languages are :mod:`~emberbox.service.oneshot.languages`'; the checked plan and the
classification of results :mod:`~emberbox.service.oneshot.plan`'s (both re-exported here).

A run takes these steps:

1. Create a sandbox of ``Settings.run_image``: from the warm pool when it holds that
   image, else restored from the image's template.
2. For compiled languages, compile within ``run_compile_timeout_s``. A non-zero exit or a
   timeout is ``compile_error``.
3. Run the program with the caller's stdin and args, a timeout, and memory and process
   limits. The limits are a cgroup in the guest (``limits`` in docs/protocol.md).
4. Kill the sandbox, whatever happened, in the manager's task group: the caller has its
   result without waiting for the kill.

The source and the extra files go into ``/tmp/run`` with the first of steps 2-3, in the
same agent call (the ``run`` op). The compiler and the program run as ``nobody``
(``RUN_AS``), in ``/tmp/run``. A python3 program without stdin is forked from the warm
interpreter the run image's template holds (docs/oneshot.md, "Warm runtimes"); any other
run starts its program as usual.

The status is the first of these that matches: ``memory_limit``, ``output_limit``,
``timeout``, ``runtime_error``, ``ok`` (see :func:`classify`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import anyio
import anyio.to_thread

from emberbox import errors
from emberbox.agent_client.answers import ExecLimits, ExecResult
from emberbox.agent_client.client import AgentClient, WarmProgram
from emberbox.agent_client.spec import ExecSpec
from emberbox.config import Settings
from emberbox.service import metrics
from emberbox.service.oneshot.languages import (
    LANGUAGES,
    Language,
    find_language,
    parse_versions,
    versions_command,
)
from emberbox.service.oneshot.plan import (
    AGENT_RESERVE_MIB,
    FILE_NAME_MAX,
    LIFETIME_MARGIN_S,
    MAX_FILES,
    MEMORY_NEAR_CAP,
    NOBODY,
    PIDS_MAX,
    RUN_AS,
    RUN_ENV,
    VM_OVERHEAD_MIB,
    WORK_DIR,
    WORK_NAME,
    WORK_PARENT,
    RunPlan,
    RunResult,
    RunSpec,
    RunStatus,
    check_file_name,
    classify,
    clip,
    pack_files,
    plan_run,
    program_files,
    run_limits,
    vm_memory_mib,
)
from emberbox.service.sandboxes.execs import Executor, run_command

log = logging.getLogger(__name__)
SMALL_FILES = 256 * 1024  # a tar of fewer bytes is packed on the event loop (no thread)
INLINE_MAX = 384 * 1024  # tar + stdin sent in the run request itself (base64: 512 KiB)


class _Record(Protocol):
    @property
    def id(self) -> str: ...


class RunFiles(Protocol):
    """``SandboxManager.files``: the part a run uses."""

    async def tar_in(
        self, sandbox_id: str, path: str, data: AsyncIterable[bytes], *, size: int | None = None
    ) -> int: ...


class RunManager(Executor, Protocol):
    """What a run needs of :class:`~emberbox.service.sandboxes.manager.SandboxManager`."""

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

    async def kill(self, sandbox_id: str) -> None: ...


async def run_code(manager: RunManager, settings: Settings, spec: RunSpec) -> RunResult:
    """Compile and run ``spec`` in a fresh sandbox of ``settings.run_image``, then kill it.

    Raises InvalidRequest (unknown language, bad file names, limits) before anything
    starts, HostError when the server has no run image, and the manager's errors
    (QuotaExceeded, VMMError ...) when no sandbox can be had.
    """
    plan = plan_run(settings, spec)
    t0 = time.monotonic()
    status = "error"  # what the metric says when no result came
    try:
        result = await _run_planned(manager, settings, spec, plan)
        status = str(result.status)
        return result
    finally:
        metrics.ONESHOT_SECONDS.labels(plan.language.name, status).observe(time.monotonic() - t0)


async def _run_planned(
    manager: RunManager, settings: Settings, spec: RunSpec, plan: RunPlan
) -> RunResult:
    """``run_code`` once ``plan`` is checked: a sandbox, the run, the sandbox killed."""
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
            await _kill(manager, record.id)


@runtime_checkable
class BackgroundTasks(Protocol):
    """``SandboxManager.in_background``: a task in the manager's own task group."""

    def in_background(
        self, func: Callable[[str], Coroutine[None, None, None]], arg: str, /
    ) -> bool: ...


@runtime_checkable
class HandleSource(Protocol):
    """``SandboxManager.running_handle``: the sandbox's agent, for the ``run`` op."""

    async def running_handle(self, sandbox_id: str, /) -> tuple[object, Any]: ...


async def _kill(manager: RunManager, sandbox_id: str) -> None:
    """Kill the run's sandbox without making the caller wait for it: in the manager's
    task group, which ends it even if the caller goes away (and at the manager's close);
    awaited here when the manager has no task group."""

    async def kill(sandbox_id: str) -> None:
        with anyio.CancelScope(shield=True):  # the manager's close() waits for it
            try:
                await manager.kill(sandbox_id)
            except Exception:  # a task of the manager's group must not end the group
                log.exception("run: killing sandbox %s failed", sandbox_id)

    if not (isinstance(manager, BackgroundTasks) and manager.in_background(kill, sandbox_id)):
        await kill(sandbox_id)


async def _agent_of(manager: RunManager, sandbox_id: str) -> AgentClient | None:
    """The sandbox's agent client when the ``run`` op can be used on it, else None."""
    if not isinstance(manager, HandleSource):
        return None
    _, handle = await manager.running_handle(sandbox_id)
    agent = getattr(handle, "agent", None)
    return agent if isinstance(agent, AgentClient) else None


class _Steps:
    """The compile and run steps of one run, over the ``run`` op when the sandbox's agent
    allows it (the files travel with the first step; python3 runs warm when it fits),
    else over ``tar_in`` and ``exec``."""

    def __init__(
        self,
        manager: RunManager,
        settings: Settings,
        sandbox_id: str,
        agent: AgentClient | None,
        tar: bytes,
    ) -> None:
        self._manager, self._settings, self._sandbox_id = manager, settings, sandbox_id
        self._agent = agent
        self._tar: bytes | None = tar  # None once sent

    async def exec(self, spec: ExecSpec, warm: WarmProgram | None = None) -> ExecResult:
        tar, self._tar = self._tar, None
        if self._agent is None:
            if tar is not None:
                files = self._manager.files
                await files.tar_in(self._sandbox_id, WORK_PARENT, _once(tar), size=len(tar))
            self.warm = False
            return await _exec(self._manager, self._sandbox_id, spec)
        if tar is not None and len(tar) + len(spec.stdin or b"") > INLINE_MAX:
            # base64 in one frame would not fit the agent's 1 MiB: a tar_in of its own
            files = self._manager.files
            await files.tar_in(self._sandbox_id, WORK_PARENT, _once(tar), size=len(tar))
            tar = None
        spec = dataclasses.replace(spec, output_max_bytes=self._settings.exec_output_max_bytes)
        try:
            result, self.warm = await self._agent.run(spec, tar=tar, tar_dir=WORK_PARENT, warm=warm)
        except errors.InvalidRequest as exc:
            if "unknown op" not in str(exc):
                raise
            # An image built before the run op: its agent did nothing; tar_in and exec.
            self._agent, self._tar = None, tar
            return await self.exec(spec, warm)
        except errors.ExecTimeout:
            self.warm = False
            return _timed_out(spec)
        return result

    warm = False  # whether the last step ran warm


async def _compile_and_run(
    manager: RunManager, settings: Settings, sandbox_id: str, plan: RunPlan
) -> RunResult:
    cap = settings.run_output_max_bytes
    size = sum(len(data) for data in plan.files.values())
    if size > SMALL_FILES:
        tar = await anyio.to_thread.run_sync(pack_files, plan.files)
    else:
        tar = pack_files(plan.files)
    steps = _Steps(manager, settings, sandbox_id, await _agent_of(manager, sandbox_id), tar)
    compile_output = b""
    if plan.language.compile_argv is not None:
        compile_spec = ExecSpec(
            [*RUN_AS, *plan.language.compile_argv],
            env=RUN_ENV,
            cwd=WORK_DIR,
            timeout_s=settings.run_compile_timeout_s,
            limits=ExecLimits(memory_mib=plan.vm_memory_mib - AGENT_RESERVE_MIB, pids=PIDS_MAX),
        )
        built = await steps.exec(compile_spec)
        compile_output, _ = clip(built.stdout + built.stderr, cap)
        compile_output += _compiler_stopped(built, settings.run_compile_timeout_s)
        if built.timed_out or built.memory_limited or built.exit_code != 0:
            return RunResult(RunStatus.COMPILE_ERROR, compile_output=compile_output)
    run_spec = ExecSpec(
        [*RUN_AS, *plan.language.run_argv, *plan.args],
        env=RUN_ENV,
        cwd=WORK_DIR,
        timeout_s=plan.timeout_s,
        stdin=plan.stdin,
        limits=ExecLimits(memory_mib=plan.memory_mib, pids=PIDS_MAX),
    )
    ran = await steps.exec(run_spec, warm_program(plan))
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
        warm=steps.warm,
    )


def warm_program(plan: RunPlan) -> WarmProgram | None:
    """What the guest's warm runtime is asked to run: the program as ``nobody``, when
    its language has a warm runtime and it reads no stdin (else: the normal start)."""
    runtime = plan.language.warm_runtime
    if runtime is None or plan.stdin:
        return None
    return WarmProgram(runtime, plan.language.source_file, list(plan.args), NOBODY, NOBODY)


def _compiler_stopped(built: ExecResult, timeout_s: float) -> bytes:
    """What the compile output gets when emberbox, not the compiler, ended it."""
    if built.timed_out:
        return f"\nemberbox: compilation timed out after {timeout_s:g} s\n".encode()
    if built.memory_limited:
        return b"\nemberbox: the compiler ran out of memory\n"
    return b""


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _exec(manager: RunManager, sandbox_id: str, spec: ExecSpec) -> ExecResult:
    """``run_command``; an agent that outlived the timeout without any output to show
    counts as a command killed at its timeout."""
    try:
        return await run_command(manager, sandbox_id, spec)
    except errors.ExecTimeout:
        return _timed_out(spec)


def _timed_out(spec: ExecSpec) -> ExecResult:
    killed = 128 + signal.SIGKILL
    duration_ms = (spec.timeout_s or 0.0) * 1000
    return ExecResult(killed, b"", b"", duration_ms, timed_out=True, signal=signal.SIGKILL)


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
        result = await manager.exec(record.id, ExecSpec(versions_command(), timeout_s=60))
    finally:
        with anyio.CancelScope(shield=True):
            await manager.kill(record.id)
    return parse_versions(result.stdout.decode("utf-8", "replace"))


__all__ = [
    "AGENT_RESERVE_MIB",
    "FILE_NAME_MAX",
    "LANGUAGES",
    "LIFETIME_MARGIN_S",
    "MAX_FILES",
    "MEMORY_NEAR_CAP",
    "NOBODY",
    "PIDS_MAX",
    "RUN_AS",
    "RUN_ENV",
    "VM_OVERHEAD_MIB",
    "WORK_DIR",
    "WORK_NAME",
    "WORK_PARENT",
    "ImageHashes",
    "Language",
    "LanguageInfo",
    "LanguageVersions",
    "RunFiles",
    "RunManager",
    "RunPlan",
    "RunResult",
    "RunSpec",
    "RunStatus",
    "check_file_name",
    "classify",
    "clip",
    "find_language",
    "pack_files",
    "parse_versions",
    "plan_run",
    "program_files",
    "run_code",
    "run_limits",
    "versions_command",
    "vm_memory_mib",
]
