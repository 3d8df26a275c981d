"""Helpers shared by the CLI commands: one-line errors and Settings."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from emberbox.config import Settings
from emberbox.errors import EmberboxError

EXIT_ERROR = 125  # emberbox itself failed (as docker run does), not the user's command
err_console = Console(stderr=True, highlight=False)


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    err_console.print(f"[red]emberbox: error:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


def load_settings() -> Settings:
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


def write_out(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def write_err(data: bytes) -> None:
    sys.stderr.buffer.write(data)
    sys.stderr.buffer.flush()
