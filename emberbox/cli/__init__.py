"""The ``emberbox`` command line (Typer + Rich).

Errors from the library print as one line without a traceback and exit non-zero.

Two kinds of verbs. The client verbs (``sandbox``, ``snapshot``, ``cp``,
``port-forward``, ``exec-code``, ``mcp``) talk to a server through the SDK and need
only ``pip install emberbox`` (``mcp`` also the ``mcp`` package: ``emberbox[mcp]``,
imported when it runs). The server verbs
(``serve``, ``image``, ``run``, ``keys``, ``audit``, ``doctor``) run the server's code,
which needs ``pip install 'emberbox[server]'``: they are imported only when they are
invoked or listed, and without the server's dependencies they stay listed but print one
line saying what to install and exit 1.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

import typer

app = typer.Typer(
    name="emberbox",
    help="Run untrusted code in microVMs on your own Linux host.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

CLIENT_VERBS = ("sandbox", "snapshot", "cp", "port-forward", "exec-code", "mcp")
# verb -> (module, attribute): a Typer app (a group of verbs) or a command function.
SERVER_VERBS: dict[str, tuple[str, str]] = {
    "serve": ("emberbox.cli.serve", "serve"),
    "image": ("emberbox.cli.images", "app"),
    "run": ("emberbox.cli.local_run", "run"),
    "keys": ("emberbox.cli.keys", "app"),
    "audit": ("emberbox.cli.keys", "audit"),
    "doctor": ("emberbox.cli.doctor", "doctor"),
    "cluster": ("emberbox.cli.cluster", "app"),
}
_SETTINGS: dict[str, dict[str, Any]] = {"run": {"allow_interspersed_args": False}}
SERVER_PANEL = "Server commands (they need 'emberbox\\[server]')"
EXIT_NO_SERVER = 1


def _mount_client_verbs() -> None:
    from emberbox.cli import files, forward, sandbox, snapshot
    from emberbox.cli.exec_code import exec_code
    from emberbox.cli.mcp import mcp

    app.add_typer(sandbox.app, name="sandbox")
    app.add_typer(snapshot.app, name="snapshot")
    app.command()(files.cp)
    app.command("port-forward")(forward.port_forward)
    app.command("exec-code")(exec_code)
    app.command()(mcp)


def _mount_server_verb(verb: str) -> None:
    """The verb's real command, or a stand-in when the server's dependencies are missing."""
    module_name, attribute = SERVER_VERBS[verb]
    try:
        target = getattr(importlib.import_module(module_name), attribute)
    except ModuleNotFoundError as exc:
        if not exc.name or exc.name.partition(".")[0] == "emberbox":
            raise  # our own code is broken: a traceback is the right answer
        _mount_stand_in(verb, missing=exc.name)
        return
    if isinstance(target, typer.Typer):
        app.add_typer(target, name=verb, rich_help_panel=SERVER_PANEL)
    else:
        app.command(verb, context_settings=_SETTINGS.get(verb), rich_help_panel=SERVER_PANEL)(
            target
        )


def _mount_stand_in(verb: str, missing: str) -> None:
    def needs_server() -> None:
        message = f"emberbox {verb} needs the server: pip install 'emberbox[server]'"
        typer.echo(f"{message} (missing: {missing})", err=True)
        raise typer.Exit(EXIT_NO_SERVER)

    app.command(
        verb,
        help="Not installed here: pip install 'emberbox\\[server]'.",
        add_help_option=False,  # `--help` too says what to install
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
        rich_help_panel=SERVER_PANEL,
    )(needs_server)


def server_verbs_needed(args: list[str]) -> list[str]:
    """The server verbs to import for this command line: the one invoked; none for a
    client verb; all of them to list them (``--help``) or suggest one (a typo)."""
    verb = args[0] if args and not args[0].startswith("-") else None
    if verb in SERVER_VERBS:
        return [verb]
    if verb in CLIENT_VERBS:
        return []
    return list(SERVER_VERBS)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="emberbox: %(levelname)s: %(message)s")
    _mount_client_verbs()
    for verb in server_verbs_needed(sys.argv[1:]):
        _mount_server_verb(verb)
    sys.exit(app())
