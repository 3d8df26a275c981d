"""Stand-ins for what a one-shot run drives (``emberbox.service.oneshot.runner``):
managers whose execs are answered by a script (:class:`ScriptedManager`) or by markers
in the program's source (:class:`ProgramManager`), and an image catalog that names
its build (:class:`HashedImages`)."""

from __future__ import annotations

import io
import itertools
import tarfile
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from emberbox import errors
from emberbox.agent_client.answers import ExecLimits, ExecResult
from emberbox.agent_client.calls import OutputCallback
from emberbox.agent_client.spec import ExecSpec
from emberbox.service.oneshot.runner import RUN_AS

if TYPE_CHECKING:
    from emberbox.service.oneshot.runner import ImageHashes, RunFiles, RunManager

VERSIONS = b"python3=Python 3.11.2\nnode=v18.20.4\nc=gcc (Debian 12.2.0-14) 12.2.0\n"

Script = Callable[[list[str]], ExecResult]


def exec_result(**fields: Any) -> ExecResult:
    """An ExecResult: exit code 0, no output, 5 ms, unless ``fields`` say otherwise."""
    return ExecResult(
        **{"exit_code": 0, "stdout": b"", "stderr": b"", "duration_ms": 5.0, **fields}
    )


@dataclass
class Created:
    """What ``create`` answers: the new sandbox's id."""

    id: str


@dataclass
class ScriptedFiles:
    """``manager.files``: records tar_in calls (and raises ``error`` if set)."""

    calls: list[tuple[str, Any]]
    error: errors.EmberboxError | None = None

    async def tar_in(
        self, sandbox_id: str, path: str, data: AsyncIterable[bytes], *, size: int | None = None
    ) -> int:
        tar = b"".join([chunk async for chunk in data])
        assert size == len(tar)
        self.calls.append(("tar_in", {"path": path, "tar": tar}))
        if self.error is not None:
            raise self.error
        return 1


@dataclass
class ScriptedManager:
    """create/exec/kill; ``script`` answers each exec (argv in, result out)."""

    script: Script = field(default=lambda argv: exec_result())
    calls: list[tuple[str, Any]] = field(default_factory=list)
    create_error: errors.EmberboxError | None = None
    files: ScriptedFiles = field(init=False)

    def __post_init__(self) -> None:
        self.files = ScriptedFiles(self.calls)

    async def create(self, **kwargs: Any) -> Created:
        self.calls.append(("create", kwargs))
        if self.create_error is not None:
            raise self.create_error
        return Created("sb-1")

    async def exec(
        self,
        sandbox_id: str,
        spec: ExecSpec,
        *,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> ExecResult:
        cmd = spec.command
        argv = cmd if isinstance(cmd, list) else ["sh", "-c", cmd]
        unprivileged = argv[: len(RUN_AS)] == list(RUN_AS)
        if unprivileged:
            argv = argv[len(RUN_AS) :]
        self.calls.append(("exec", {"argv": argv, "cwd": spec.cwd, "timeout_s": spec.timeout_s,
                                    "stdin": spec.stdin, "limits": spec.limits,
                                    "env": dict(spec.env), "nobody": unprivileged}))  # fmt: skip
        return self.script(argv)

    async def kill(self, sandbox_id: str) -> None:
        self.calls.append(("kill", sandbox_id))

    def execs(self) -> list[dict[str, Any]]:
        return [info for name, info in self.calls if name == "exec"]


class ProgramManager:
    """create/exec/kill where the program's source decides what happens: ``EXIT3``,
    ``LOOP`` (timeout), ``ALLOC`` (memory), ``SPAM`` (output) or ``SYNTAX`` (compiler)."""

    def __init__(self) -> None:
        self.written: dict[str, dict[str, bytes]] = {}
        self.files = self  # manager.files.tar_in
        self.live: set[str] = set()
        self.created = 0
        self._ids = itertools.count(1)

    async def create(self, **kwargs: Any) -> Created:
        sandbox_id = f"sb-{next(self._ids)}"
        self.created += 1
        self.live.add(sandbox_id)
        return Created(sandbox_id)

    async def exec(
        self,
        sandbox_id: str,
        spec: ExecSpec,
        *,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> ExecResult:
        assert sandbox_id in self.live
        cmd = spec.command
        if isinstance(cmd, str):  # the versions
            return ExecResult(0, VERSIONS, b"", 1.0)
        assert cmd[: len(RUN_AS)] == list(RUN_AS)
        cmd = cmd[len(RUN_AS) :]
        source = b"".join(self.written[sandbox_id].values())
        if cmd[0] in ("gcc", "g++"):
            failed = b"SYNTAX" in source
            return ExecResult(int(failed), b"", b"error: SYNTAX" if failed else b"", 9.0)
        args = cmd[1:] if cmd[0] == "./main" else cmd[2:]  # past the interpreter's file
        return program_outcome(source, spec.stdin or b"", args, spec.limits)

    async def tar_in(
        self, sandbox_id: str, path: str, data: AsyncIterable[bytes], *, size: int | None = None
    ) -> int:
        assert sandbox_id in self.live
        packed = b"".join([chunk async for chunk in data])
        with tarfile.open(fileobj=io.BytesIO(packed)) as tar:
            written = {}
            for member in tar.getmembers():
                extracted = tar.extractfile(member) if member.isfile() else None
                if extracted is not None:
                    written[member.name] = extracted.read()
            self.written[sandbox_id] = written
        return len(self.written[sandbox_id])

    async def kill(self, sandbox_id: str) -> None:
        self.live.discard(sandbox_id)


def program_outcome(
    source: bytes, stdin: bytes, argv: list[str], limits: ExecLimits | None
) -> ExecResult:
    """What running ``source`` does, by the markers in it."""
    cap_kib = (limits.memory_mib if limits and limits.memory_mib else 0) * 1024
    if b"LOOP" in source:
        return ExecResult(137, b"", b"", 2000.0, timed_out=True, signal=9)
    if b"ALLOC" in source:
        return ExecResult(
            137, b"", b"", 50.0, signal=9, memory_limited=True, peak_memory_kib=cap_kib
        )
    if b"SPAM" in source:
        return ExecResult(0, b"x" * (16 << 20), b"", 900.0, output_truncated=True)
    code = 3 if b"EXIT3" in source else 0
    out = b"hello " + stdin + " ".join(argv).encode()
    return ExecResult(code, out, b"", 12.5, peak_memory_kib=2048)


class HashedImages:
    """``ImageRegistry.get`` whose every image is of the build ``image_hash``."""

    def __init__(self, image_hash: str = "aaa") -> None:
        self.image_hash = image_hash

    def get(self, name: str) -> object:
        return SimpleNamespace(image_hash=self.image_hash)


if TYPE_CHECKING:
    _scripted: RunManager = ScriptedManager()
    _scripted_files: RunFiles = ScriptedManager().files
    _programs: RunManager = ProgramManager()
    _program_files: RunFiles = ProgramManager()
    _hashes: ImageHashes = HashedImages()
