"""Wire schemas of one-shot runs (``POST /v1/run``, ``GET /v1/languages``), shared by the
API, the SDK and the CLI. Same conventions as :mod:`emberbox.models.common`: requests forbid
unknown fields; the server's limits (``Settings.run_*``) are checked by the service."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from emberbox.models.common import PublicModel, RequestModel

# The values of emberbox.service.oneshot.runner.RunStatus.
RunStatusName = Literal[
    "ok", "runtime_error", "compile_error", "timeout", "memory_limit", "output_limit"
]

MAX_SOURCE_CHARS = 4 << 20  # wire bound of one source or file, and of stdin
MAX_RUN_TIMEOUT_S = 24 * 3600.0  # wire bound; Settings.run_max_timeout_s applies
NoNul = StringConstraints(pattern=r"^[^\x00]*$")
FileName = Annotated[str, StringConstraints(min_length=1, max_length=255)]


class RunFile(RequestModel):
    """An extra file next to the program, e.g. a header or a module."""

    name: FileName = Field(description="Relative path, e.g. `util.h` or `lib/util.py`.")
    content: str = Field(max_length=MAX_SOURCE_CHARS, description="Text (written as UTF-8).")


class RunRequest(RequestModel):
    """Compile (if needed) and run one program in a fresh sandbox."""

    language: str = Field(min_length=1, max_length=32, description="See `GET /v1/languages`.")
    code: str = Field(max_length=MAX_SOURCE_CHARS, description="The program's source.")
    files: list[RunFile] = Field(default_factory=list, max_length=64)
    stdin: str = Field(default="", max_length=MAX_SOURCE_CHARS, description="Fed to the program.")
    args: list[Annotated[str, NoNul]] = Field(
        default_factory=list, max_length=256, description="Command-line arguments."
    )
    timeout_s: float | None = Field(
        default=None,
        gt=0,
        le=MAX_RUN_TIMEOUT_S,
        allow_inf_nan=False,
        description="Wall-clock limit of the run (not the compile); null: server default (10).",
    )
    memory_mib: int | None = Field(
        default=None,
        ge=16,
        le=1_048_576,
        description="Memory limit of the program in MiB; null: server default (256).",
    )


class RunResponse(PublicModel):
    """How the run ended. Output is UTF-8 decoded, invalid bytes replaced, and cut at the
    server's cap (`output_limit` when it was)."""

    status: RunStatusName
    exit_code: int | None = Field(description="null when the program never ran.")
    signal: int | None = Field(default=None, description="Signal that ended the program.")
    stdout: str
    stderr: str
    compile_output: str = Field(description="The compiler's stdout and stderr.")
    time_ms: float | None = Field(description="Wall-clock time of the run step.")
    memory_kib: int | None = Field(description="Peak memory of the run step, when known.")


class LanguagePublic(PublicModel):
    """A language `POST /v1/run` accepts."""

    name: str
    version: str | None = Field(description="As its version command reports; null: unknown.")
    source_file: str = Field(description="The name the program is saved under.")
    compiled: bool


class LanguageList(PublicModel):
    languages: list[LanguagePublic]


__all__ = [
    "LanguageList",
    "LanguagePublic",
    "RunFile",
    "RunRequest",
    "RunResponse",
    "RunStatusName",
]
