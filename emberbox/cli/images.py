"""``emberbox image build|list``."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from emberbox.cli.common import clean_errors, load_settings
from emberbox.images.build import RECIPES, ImageBuilder
from emberbox.images.registry import ImageRegistry

app = typer.Typer(help="Build and list guest images.", no_args_is_help=True)
console = Console(highlight=False)


@app.command()
def build(
    name: Annotated[str, typer.Option(help=f"Recipe to build: {', '.join(RECIPES)}.")] = "default",
    force: Annotated[
        bool, typer.Option(help="Rebuild even when the inputs are unchanged.")
    ] = False,
) -> None:
    """Build a guest image (kernel, initramfs, root filesystem) from Debian's packages."""
    settings = load_settings()
    started = time.monotonic()
    last = [started]
    with clean_errors(), console.status("starting", spinner="dots") as status:

        def progress(step: str) -> None:
            now = time.monotonic()
            if status.status != "starting":
                console.print(f"  [green]✓[/green] {status.status} ({now - last[0]:.1f} s)")
            last[0] = now
            status.update(step)

        info, cached = ImageBuilder(settings, progress).build(name, force=force)
        if not cached:
            console.print(
                f"  [green]✓[/green] {status.status} ({time.monotonic() - last[0]:.1f} s)"
            )
    verdict = "up to date (cache hit)" if cached else f"built in {time.monotonic() - started:.1f} s"
    console.print(f"image [bold]{info.name}[/bold] {info.image_hash}: {verdict}")
    console.print(f"  {info.directory}")


@app.command("list")
def list_images(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List the registered images."""
    images = ImageRegistry(load_settings()).list()
    if as_json:
        rows = [
            {
                "name": i.name,
                "image_hash": i.image_hash,
                "kernel": i.kernel_release,
                "size_bytes": i.size_bytes,
                "created_at": i.created_at.isoformat(),
                "directory": str(i.directory),
            }
            for i in images
        ]
        typer.echo(json.dumps(rows, indent=2))
        return
    if not images:
        console.print("no images yet: run `emberbox image build`")
        return
    table = Table("name", "hash", "kernel", "disk used", "built")
    for i in images:
        table.add_row(
            i.name,
            i.image_hash,
            i.kernel_release,
            f"{i.size_bytes / 2**20:.0f} MiB",
            i.created_at.strftime("%Y-%m-%d %H:%M"),
        )
    console.print(table)
