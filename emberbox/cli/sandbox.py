"""``emberbox sandbox ...``: manage sandboxes of a running server through the SDK.

``emberbox snapshot ...`` (:mod:`emberbox.cli.snapshot`) lists and deletes snapshots.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from emberbox.cli import ids
from emberbox.cli.common import (
    ApiKey,
    Json,
    Url,
    clean_errors,
    err_console,
    print_json,
    print_table,
)
from emberbox.sdk import CommandResult, Sandbox, SandboxInfo

EXIT_TIMEOUT = 124  # what coreutils' timeout(1) uses

app = typer.Typer(help="Manage sandboxes through a running server", no_args_is_help=True)

_out = Console()

SandboxId = Annotated[str, typer.Argument(help="Sandbox id", show_default=False)]
Pairs = Annotated[
    list[str] | None,
    typer.Option(metavar="KEY=VALUE", help="Repeatable KEY=VALUE pair", show_default=False),
]


def _parse_pairs(items: list[str] | None, option: str) -> dict[str, str] | None:
    if not items:
        return None
    pairs: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint=option)
        pairs[key] = value
    return pairs


def _network(egress: str | None, allow: list[str] | None) -> dict[str, object] | None:
    """The create request's ``network`` (None: no network); the server checks it."""
    if egress is None and not allow:
        return None
    return {"egress": egress or "allowlist", "allow": list(allow or [])}


def _table(infos: list[SandboxInfo]) -> Table:
    table = Table("ID", "STATE", "IMAGE", "VCPUS", "MEMORY", "EXPIRES (UTC)", "IP", "METADATA")
    for info in infos:
        table.add_row(
            info.id,
            info.state if info.error is None else f"{info.state}: {info.error}",
            info.image,
            str(info.vcpus),
            f"{info.memory_mib} MiB",
            info.expires_at.strftime("%Y-%m-%d %H:%M:%S"),
            info.ip_address or "-",
            ", ".join(f"{k}={v}" for k, v in sorted(info.metadata.items())) or "-",
        )
    return table


def _show(infos: list[SandboxInfo], as_json: bool, *, single: bool = False) -> None:
    if as_json:
        if single:
            print_json(infos[0].model_dump_json(indent=2))
        else:
            print_json("[" + ",".join(i.model_dump_json() for i in infos) + "]")
        return
    print_table(_out, _table(infos))


@app.command()
def create(
    image: Annotated[
        str | None, typer.Option(help="Image name (default: the server's)", show_default=False)
    ] = None,
    vcpus: Annotated[int | None, typer.Option(help="Virtual CPUs", show_default=False)] = None,
    memory_mib: Annotated[
        int | None, typer.Option(help="Memory in MiB", show_default=False)
    ] = None,
    timeout_s: Annotated[
        int | None, typer.Option(help="Lifetime in seconds", show_default=False)
    ] = None,
    metadata: Pairs = None,
    env: Pairs = None,
    snapshot_id: Annotated[
        str | None,
        typer.Option("--snapshot", help="Fork from this snapshot id", show_default=False),
    ] = None,
    egress: Annotated[
        str | None,
        typer.Option(
            metavar="none|allowlist|full",
            help="Network egress (default: no network; --allow alone means allowlist)",
            show_default=False,
        ),
    ] = None,
    allow: Annotated[
        list[str] | None,
        typer.Option(
            metavar="DEST",
            help="Repeatable: IP, CIDR, IP:port, CIDR:port, host:port or host",
            show_default=False,
        ),
    ] = None,
    as_json: Json = False,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Boot a sandbox, or fork one from --snapshot, and print it.

    Its id is what the other commands take.
    """
    with clean_errors():
        sandbox = Sandbox.create(
            image,
            vcpus=vcpus,
            memory_mib=memory_mib,
            timeout_s=timeout_s,
            metadata=_parse_pairs(metadata, "--metadata"),
            env=_parse_pairs(env, "--env"),
            snapshot_id=snapshot_id and ids.snapshot_id(snapshot_id, url, api_key),
            network=_network(egress, allow),
            url=url,
            api_key=api_key,
        )
        with _closing(sandbox):
            _show([sandbox.info()], as_json, single=True)


@app.command("list")
def list_(
    state: Annotated[str | None, typer.Option(help="Only sandboxes in this state")] = None,
    metadata: Pairs = None,
    as_json: Json = False,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """List sandboxes, optionally filtered by state and metadata."""
    with clean_errors():
        infos = Sandbox.list(
            state=state, metadata=_parse_pairs(metadata, "--metadata"), url=url, api_key=api_key
        )
    _show(infos, as_json)


@app.command()
def get(
    sandbox_id: SandboxId, as_json: Json = False, url: Url = None, api_key: ApiKey = None
) -> None:
    """Show one sandbox."""
    with clean_errors(), _opened(sandbox_id, url, api_key) as sandbox:
        _show([sandbox.info()], as_json, single=True)


@app.command(
    "exec",
    context_settings={"allow_interspersed_args": False},  # options after the id go to cmd
)
def exec_(
    sandbox_id: SandboxId,
    cmd: Annotated[
        list[str], typer.Argument(help="One argument runs in /bin/sh -c; more are argv")
    ],
    env: Pairs = None,
    cwd: Annotated[str | None, typer.Option(help="Working directory in the guest")] = None,
    timeout_s: Annotated[float | None, typer.Option(help="Kill after this many seconds")] = None,
    stdin: Annotated[str | None, typer.Option(help="Text for stdin; '-' reads ours")] = None,
    as_json: Json = False,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Run a command; print its output and exit with its exit status.

    Options go before SANDBOX_ID; everything after it belongs to the command, and a
    `--` right after SANDBOX_ID is only a separator: emberbox sandbox exec ID -- ls -l
    """
    if cmd[0] == "--":  # a separator, never the program: `exec ID -- sh -c '...'`
        cmd = cmd[1:]
    if not cmd:
        raise typer.BadParameter("no command after --", param_hint="CMD")
    if stdin == "-":
        stdin = sys.stdin.read()
    command: list[str] | str = cmd[0] if len(cmd) == 1 else cmd
    with clean_errors(), _opened(sandbox_id, url, api_key) as sandbox:
        result = sandbox.commands.run(
            command, env=_parse_pairs(env, "--env"), cwd=cwd, timeout_s=timeout_s, stdin=stdin
        )
    if as_json:
        print_json(result.model_dump_json(indent=2))
    else:
        sys.stdout.write(result.stdout)
        sys.stdout.flush()
        sys.stderr.write(result.stderr)
        if result.timed_out:
            seconds = result.duration_ms / 1000
            err_console.print(
                f"emberbox: command timed out after {seconds:.1f} s and was killed "
                f"(exit code {EXIT_TIMEOUT})"
            )
    raise typer.Exit(exit_status(result))


def exit_status(result: CommandResult) -> int:
    """The shell's convention: 124 on timeout, 128+N for signal N, else the exit code."""
    if result.timed_out:
        return EXIT_TIMEOUT
    if result.signal is not None:
        return 128 + result.signal
    return result.exit_code if 0 <= result.exit_code <= 255 else 1


@app.command()
def kill(sandbox_id: SandboxId, url: Url = None, api_key: ApiKey = None) -> None:
    """Kill a sandbox (killing it again is fine)."""
    with clean_errors(), _opened(sandbox_id, url, api_key) as sandbox:
        sandbox.kill()
    err_console.print(f"killed {sandbox.id}", markup=False)


@app.command()
def timeout(
    sandbox_id: SandboxId,
    seconds: Annotated[int, typer.Argument(help="New lifetime in seconds, from now")],
    as_json: Json = False,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Kill the sandbox SECONDS from now instead of at its current deadline."""
    with clean_errors(), _opened(sandbox_id, url, api_key) as sandbox:
        _show([sandbox.set_timeout(seconds)], as_json, single=True)


@app.command()
def pause(
    sandbox_id: SandboxId, as_json: Json = False, url: Url = None, api_key: ApiKey = None
) -> None:
    """Save a running sandbox to disk and free its CPU and memory until resumed."""
    with clean_errors(), _opened(sandbox_id, url, api_key) as sandbox:
        _show([sandbox.pause()], as_json, single=True)


@app.command()
def resume(
    sandbox_id: SandboxId, as_json: Json = False, url: Url = None, api_key: ApiKey = None
) -> None:
    """Bring a paused sandbox back where it left off."""
    with clean_errors(), _opened(sandbox_id, url, api_key) as sandbox:
        _show([sandbox.resume()], as_json, single=True)


@app.command()
def snapshot(
    sandbox_id: SandboxId,
    as_json: Annotated[bool, typer.Option("--json", help="Print the snapshot as JSON")] = False,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Save a running sandbox's memory and disk (it keeps running); print the snapshot id.

    Fork from it with: emberbox sandbox create --snapshot SNAPSHOT_ID
    """
    with clean_errors(), _opened(sandbox_id, url, api_key) as sandbox:
        info = sandbox.snapshot()
    if as_json:
        print_json(info.model_dump_json(indent=2))
    else:
        sys.stdout.write(info.id + "\n")


@app.command()
def shell(
    sandbox_id: SandboxId,
    cmd: Annotated[
        str | None,
        typer.Option("--cmd", help="Program to run (default: a login shell)", show_default=False),
    ] = None,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Open an interactive terminal in a sandbox; exit with its program's status.

    Leaving the program (exit, Ctrl-D) closes the terminal; closing the terminal ends it.
    """
    from emberbox.cli.shell import run_shell

    with clean_errors():
        whole_id = ids.sandbox_id(sandbox_id, url, api_key)
        code = asyncio.run(run_shell(whole_id, cmd, url, api_key))
    raise typer.Exit(code)


@contextmanager
def _opened(given_id: str, url: str | None, api_key: str | None) -> Iterator[Sandbox]:
    """A handle on the sandbox ``given_id`` (an id or a unique prefix) names."""
    with _closing(Sandbox(ids.sandbox_id(given_id, url, api_key), url=url, api_key=api_key)) as sb:
        yield sb


@contextmanager
def _closing(sandbox: Sandbox) -> Iterator[Sandbox]:
    # Close the HTTP client only: the sandbox itself outlives the command.
    try:
        yield sandbox
    finally:
        sandbox.close()
