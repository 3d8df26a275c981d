"""Helpers shared by the CLI commands: one-line errors, Settings and the client options."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from emberbox.errors import EmberboxError

if TYPE_CHECKING:  # the server's settings: emberbox.config needs the `server` extra
    from emberbox.config import Settings

EXIT_ERROR = 125  # emberbox itself failed (as docker run does), not the user's command
err_console = Console(stderr=True, highlight=False)

# Options of the commands that talk to a server through the SDK.
Url = Annotated[
    str | None,
    typer.Option("--url", envvar="EMBERBOX_URL", help="Server URL (default http://127.0.0.1:8080)"),
]
ApiKey = Annotated[
    str | None,
    typer.Option("--api-key", envvar="EMBERBOX_API_KEY", help="Bearer key", show_default=False),
]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table")]


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    err_console.print(f"[red]emberbox: error:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


def load_settings() -> Settings:
    from emberbox.config import Settings

    try:
        return Settings()
    except ValidationError as exc:
        fail(f"invalid EMBERBOX_* setting: {exc}")


@contextmanager
def clean_errors() -> Iterator[None]:
    """Turn emberbox errors and Ctrl-C into one line and an exit code."""
    try:
        yield
    except EmberboxError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        err_console.print("emberbox: interrupted")
        raise typer.Exit(130) from None


def print_json(text: str) -> None:
    sys.stdout.write(text + "\n")


def print_table(console: Console, table: Table, *, whole: int = 1) -> None:
    """Print ``table`` with its first ``whole`` columns (the ids) never cut: the other
    columns wrap, and the table grows past the console's width (80 columns when piped)
    if even that is not enough."""
    for index, column in enumerate(table.columns):
        if index < whole:
            column.no_wrap = True
            column.overflow = "ignore"
        else:
            column.overflow = "fold"
    unbounded = console.options.update_width(2**16)
    needed = Measurement.get(console, unbounded, table).minimum
    if needed > console.width:
        console = Console(width=needed, file=console.file, highlight=False)
    console.print(table)


def write_out(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def write_err(data: bytes) -> None:
    sys.stderr.buffer.write(data)
    sys.stderr.buffer.flush()
