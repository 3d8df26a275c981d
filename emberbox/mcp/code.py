"""A program run in an existing sandbox (``run_code`` given a ``sandbox_id``): where its
source goes, how it is compiled and run, and how the outcome is judged. Pure functions;
the tool carries the plan out through the SDK.

Without a sandbox the tool uses the server's one-shot ``/v1/run``, whose table lives on
the server (``service/oneshot/languages.py``); the commands here are the same, so a
program behaves alike in both. Unlike ``/v1/run`` the program runs as the sandbox's own
user, in a directory of its own that is left in place for later tools to look at.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Literal

from emberbox.mcp.results import CodeResult, CodeStatus
from emberbox.sdk import CommandResult

Language = Literal["python3", "bash", "node", "c", "c++"]
WORK_PARENT = "/tmp"
COMPILE_TIMEOUT_S = 120.0  # the compiler under TCG is slow (cc1plus and <iostream>)

# language -> (source file, compile argv or None, run argv)
_TABLE: dict[str, tuple[str, tuple[str, ...] | None, tuple[str, ...]]] = {
    "python3": ("main.py", None, ("python3", "main.py")),
    "bash": ("main.sh", None, ("bash", "main.sh")),
    "node": ("main.js", None, ("node", "main.js")),
    "c": ("main.c", ("gcc", "-O2", "-std=gnu17", "-o", "main", "main.c", "-lm"), ("./main",)),
    "c++": ("main.cpp", ("g++", "-O2", "-std=gnu++17", "-o", "main", "main.cpp"), ("./main",)),
}
LANGUAGES: tuple[str, ...] = tuple(_TABLE)


@dataclass(frozen=True)
class CodePlan:
    """Write the source to ``source_path``, then run ``compile_argv`` (if any) and
    ``run_argv`` with ``work_dir`` as their working directory."""

    work_dir: str
    source_path: str
    compile_argv: list[str] | None
    run_argv: list[str]


def plan(language: str, token: str) -> CodePlan:
    """The plan for one run; ``token`` names its directory (``/tmp/mcp-run-<token>``)."""
    source, compile_argv, run_argv = _TABLE[language]
    work_dir = posixpath.join(WORK_PARENT, f"mcp-run-{token}")
    return CodePlan(
        work_dir=work_dir,
        source_path=posixpath.join(work_dir, source),
        compile_argv=None if compile_argv is None else list(compile_argv),
        run_argv=list(run_argv),
    )


def compile_failed(compiled: CommandResult) -> bool:
    return compiled.exit_code != 0 or compiled.timed_out


def judge(sandbox_id: str, compiled: CommandResult | None, ran: CommandResult | None) -> CodeResult:
    """The outcome, with the statuses of ``/v1/run`` (never ``memory_limit``: a sandbox's
    command has no memory limit of its own)."""
    compile_output = "" if compiled is None else compiled.stdout + compiled.stderr
    if ran is None:  # the compiler failed (or ran past its timeout): the program never ran
        return CodeResult(
            status="compile_error",
            exit_code=None,
            stdout="",
            stderr="",
            compile_output=compile_output,
            time_ms=None,
            sandbox_id=sandbox_id,
        )
    status: CodeStatus = "ok" if ran.exit_code == 0 else "runtime_error"
    if ran.output_truncated:
        status = "output_limit"
    if ran.timed_out:
        status = "timeout"
    return CodeResult(
        status=status,
        exit_code=ran.exit_code,
        stdout=ran.stdout,
        stderr=ran.stderr,
        compile_output=compile_output,
        time_ms=ran.duration_ms,
        sandbox_id=sandbox_id,
    )
