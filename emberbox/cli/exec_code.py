"""``emberbox exec-code --language L FILE [-- ARGS...]``: run a program once on a server
(``POST /v1/run``) and exit as it did."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from emberbox.cli.common import ApiKey, Url, clean_errors, err_console, fail, print_json
from emberbox.sdk import RunResult, run_code

EXIT_COMPILE_ERROR = 1
EXIT_OUTPUT_LIMIT = 1
EXIT_TIMEOUT = 124  # what coreutils' timeout(1) uses
EXIT_MEMORY_LIMIT = 137  # 128 + SIGKILL, what an OOM-killed container reports


def exit_code_for(result: RunResult) -> int:
    """The CLI's exit code: the program's own, or one that names the limit it hit."""
    fixed = {
        "compile_error": EXIT_COMPILE_ERROR,
        "timeout": EXIT_TIMEOUT,
        "memory_limit": EXIT_MEMORY_LIMIT,
        "output_limit": EXIT_OUTPUT_LIMIT,
    }
    return fixed.get(result.status, result.exit_code or 0)


def _read_text(path: str, what: str) -> str:
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read {what} {path}: {exc}")


def _extra_files(specs: list[str] | None) -> dict[str, str]:
    """``--file util.h`` (its own name) or ``--file lib/util.py=src/util.py``."""
    files: dict[str, str] = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        files[name] = _read_text(path, "file")
    return files


def _report(result: RunResult) -> None:
    sys.stderr.write(result.compile_output)
    sys.stdout.write(result.stdout)
    sys.stdout.flush()
    sys.stderr.write(result.stderr)
    if result.status != "ok":
        took = "" if result.time_ms is None else f" after {result.time_ms:.0f} ms"
        peak = "" if result.memory_kib is None else f", peak memory {result.memory_kib} KiB"
        err_console.print(f"emberbox: {result.status}{took}{peak}")


def exec_code(
    file: Annotated[str, typer.Argument(help="The program's source ('-': standard input).")],
    language: Annotated[
        str, typer.Option("--language", "-l", help="python3, bash, node, c, c++ ...")
    ],
    args: Annotated[
        list[str] | None, typer.Argument(help="Arguments for the program (after --).")
    ] = None,
    stdin: Annotated[
        str | None, typer.Option(help="File fed to the program's standard input ('-': ours).")
    ] = None,
    extra: Annotated[
        list[str] | None,
        typer.Option("--file", help="Extra file: PATH or NAME=PATH (repeatable)."),
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(help="Seconds the program may run (default: server's).")
    ] = None,
    memory: Annotated[
        int | None, typer.Option(help="Memory limit of the program in MiB.", min=16)
    ] = None,
    url: Url = None,
    api_key: ApiKey = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the whole result as JSON.")
    ] = False,
) -> None:
    """Compile (if needed) and run FILE once in a fresh sandbox on the server.

    Prints the program's output and exits with its exit code: 1 on a compile error
    or past the output limit, 124 on a timeout, 137 past the memory limit.

    Example: emberbox exec-code --language c hello.c
    """
    if file == "-" and stdin == "-":
        fail("the program and --stdin cannot both come from standard input")
    code = _read_text(file, "program")
    given_stdin = None if stdin is None else _read_text(stdin, "stdin")
    with clean_errors():
        result = run_code(
            language,
            code,
            files=_extra_files(extra) or None,
            stdin=given_stdin,
            args=args,
            timeout_s=timeout,
            memory_mib=memory,
            url=url,
            api_key=api_key,
        )
    if as_json:
        print_json(result.model_dump_json(indent=2))
    else:
        _report(result)
    raise typer.Exit(exit_code_for(result))
