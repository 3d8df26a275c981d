"""The ``emberbox`` command line (Typer + Rich).

Errors from the library print as one line without a traceback and exit non-zero.
"""

from __future__ import annotations

import logging
import sys

import typer

from emberbox.cli import doctor, images
from emberbox.cli import local_run as run

app = typer.Typer(
    name="emberbox",
    help="Run untrusted code in microVMs on your own Linux host.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(images.app, name="image")
app.command(context_settings={"allow_interspersed_args": False})(run.run)
app.command()(doctor.doctor)


def _mount_service_commands() -> None:
    from emberbox.cli import files, keys, sandbox, serve, snapshot
    from emberbox.cli.exec_code import exec_code

    app.add_typer(sandbox.app, name="sandbox")
    app.add_typer(snapshot.app, name="snapshot")
    app.add_typer(keys.app, name="keys")
    app.command()(keys.audit)
    app.command()(serve.serve)
    app.command()(files.cp)
    app.command("exec-code")(exec_code)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="emberbox: %(levelname)s: %(message)s")
    _mount_service_commands()
    sys.exit(app())
