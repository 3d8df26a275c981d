"""``emberbox run -- CMD...``: boot a sandbox, run one command, stream its output, tear down."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from emberbox.agent_client.spec import ExecSpec
from emberbox.cli.common import clean_errors, err_console, load_settings, write_err, write_out
from emberbox.service.vm.machine import SandboxVM

EXIT_TIMEOUT = 124  # what coreutils' timeout(1) uses


async def _run(spec: ExecSpec, image: str | None, vcpus: int | None, memory_mib: int | None) -> int:
    settings = load_settings()
    async with SandboxVM.boot(image, vcpus, memory_mib, settings=settings) as sb:
        result = await sb.agent.exec(spec, on_stdout=write_out, on_stderr=write_err)
    if result.timed_out:
        err_console.print(
            f"emberbox: command timed out after {spec.timeout_s:g} s and was killed "
            f"(exit code {EXIT_TIMEOUT})"
        )
        return EXIT_TIMEOUT
    return result.exit_code


def run(
    cmd: Annotated[list[str], typer.Argument(help="The command and its arguments (after --).")],
    image: Annotated[str | None, typer.Option(help="Image name (default: default).")] = None,
    timeout: Annotated[
        float | None, typer.Option(help="Kill the command after this many seconds.", min=0.001)
    ] = None,
    vcpus: Annotated[int | None, typer.Option(help="Virtual CPUs.", min=1)] = None,
    memory: Annotated[int | None, typer.Option(help="Guest memory in MiB.", min=128)] = None,
) -> None:
    """Boot a fresh sandbox, run CMD in it, print its output as it comes, and exit with
    its exit code (124 when --timeout killed it). The sandbox is destroyed afterwards.

    Example: emberbox run -- python3 -c 'print(6*7)'
    """
    with clean_errors():
        code = asyncio.run(_run(ExecSpec(cmd, timeout_s=timeout), image, vcpus, memory))
    raise typer.Exit(code)
