"""``emberbox image build|import|list|rm``.

``image build -t NAME [-f Dockerfile] CONTEXT`` builds from a Dockerfile on a running
server (through the SDK): each step with its state and time, RUN output as it comes; a
failed step ends with its exit code and log tail (exit 1). ``image build`` without a
context builds a built-in recipe here, on this host (``--recipe default|polyglot``; the
old ``--name`` spelling still works: scripts/setup.sh uses it).
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from emberbox.cli.common import ApiKey, Json, Url, clean_errors, load_settings, print_table
from emberbox.images.build import RECIPES, ImageBuilder
from emberbox.images.registry import ImageRegistry
from emberbox.models.images import BuildEvent
from emberbox.sdk import ImageBuildError, ImageInfo, Images

app = typer.Typer(help="Build, import, list and delete guest images.", no_args_is_help=True)
console = Console(highlight=False)
EXIT_BUILD_FAILED = 1
LOG_TAIL_LINES = 20


@app.command()
def build(
    context: Annotated[
        str | None,
        typer.Argument(help="Build context directory (with a Dockerfile).", show_default=False),
    ] = None,
    tag: Annotated[
        str | None, typer.Option("--tag", "-t", help="The new image's name.", show_default=False)
    ] = None,
    file: Annotated[
        str, typer.Option("--file", "-f", help="The Dockerfile (default: CONTEXT/Dockerfile).")
    ] = "Dockerfile",
    build_arg: Annotated[
        list[str] | None, typer.Option("--build-arg", help="ARG value, KEY=VALUE (repeat).")
    ] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Run every step again.")] = False,
    recipe: Annotated[
        str | None,
        typer.Option(
            help=f"Build a built-in recipe here: {', '.join(RECIPES)}.", show_default=False
        ),
    ] = None,
    name: Annotated[str | None, typer.Option(hidden=True, help="Alias of --recipe.")] = None,
    force: Annotated[
        bool, typer.Option(help="Recipe: rebuild even when the inputs are unchanged.")
    ] = False,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Build an image from a Dockerfile (on the server), or a built-in recipe (here)."""
    if context is None:
        if tag or build_arg or no_cache or file != "Dockerfile":
            raise typer.BadParameter("a Dockerfile build needs its CONTEXT directory")
        _build_recipe(recipe or name or "default", force=force)
        return
    if recipe or name:
        raise typer.BadParameter("give either a CONTEXT (with -t) or --recipe, not both")
    if not tag:
        raise typer.BadParameter("-t NAME is required with a build context")
    args = {}
    for item in build_arg or []:
        key, sep, value = item.partition("=")
        if not sep:
            value = os.environ.get(key, "")  # Docker: --build-arg KEY takes $KEY
        args[key] = value
    _build_dockerfile(context, file, tag, args, no_cache, url, api_key)


def _build_dockerfile(
    context: str,
    dockerfile: str,
    tag: str,
    args: dict[str, str],
    no_cache: bool,
    url: str | None,
    api_key: str | None,
) -> None:
    started = time.monotonic()
    view = BuildView(console)
    try:
        with clean_errors():
            try:
                info = Images.build(
                    context,
                    dockerfile,
                    name=tag,
                    build_args=args,
                    no_cache=no_cache,
                    on_event=view.show,
                    url=url,
                    api_key=api_key,
                )
            except ImageBuildError as exc:
                view.failed(exc)
                raise typer.Exit(EXIT_BUILD_FAILED) from None
    finally:
        view.flush()
    seconds = time.monotonic() - started
    cached = view.ran == 0
    verdict = "all steps cached" if cached else f"{view.ran} steps run"
    console.print(
        f"image [bold]{escape(info.name)}[/bold] {info.image_hash}: built in {seconds:.1f} s "
        f"({verdict}); {info.size_bytes / 2**20:.0f} MiB on disk"
    )


class BuildView:
    """Build events as lines: each step with its state and time, RUN output indented."""

    def __init__(self, out: Console) -> None:
        self.out = out
        self.ran = 0
        self._partial = ""
        self._tail: list[str] = []
        self._failed_step: BuildEvent | None = None

    def _head(self, event: BuildEvent) -> str:
        total = f"/{event.total}" if event.total else ""
        return f"[{event.step}{total}] {escape(event.instruction or '')}"

    def show(self, event: BuildEvent) -> None:
        if event.kind == "log":
            self._log(event.log or "")
            return
        self.flush()
        if event.kind == "step":
            seconds = "" if event.seconds is None else f" ({event.seconds:.1f} s)"
            if event.state == "cached":
                self.out.print(f"  [green]✓[/green] {self._head(event)} [dim](cached)[/dim]")
            elif event.state == "running":
                self._tail = []
                self.out.print(f"  [cyan]▶[/cyan] {self._head(event)}")
            elif event.state == "done":
                self.ran += 1
                self.out.print(f"  [green]✓[/green] {self._head(event)}{seconds}")
            elif event.state == "failed":
                self._failed_step = event
                code = "" if event.exit_code is None else f" exit code {event.exit_code}"
                self.out.print(
                    f"  [red]✗[/red] {self._head(event)} [red]failed{code}[/red]{seconds}"
                )
        elif event.kind == "progress":
            self.out.print(f"  [dim]· {escape(event.message or '')}[/dim]")

    def _log(self, text: str) -> None:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            self._line(line)

    def _line(self, line: str) -> None:
        self._tail = [*self._tail, line][-LOG_TAIL_LINES:]
        self.out.print(f"    [dim]│[/dim] {escape(line.rstrip())}", soft_wrap=True)

    def flush(self) -> None:
        if self._partial:
            self._line(self._partial)
            self._partial = ""

    def failed(self, exc: ImageBuildError) -> None:
        self.flush()
        details = exc.details
        code = details.get("exit_code")
        step = details.get("step")
        where = f"step {step}" if step else "the build"
        self.out.print(f"[red]error:[/red] {escape(exc.message)}", soft_wrap=True)
        if code is not None:
            self.out.print(f"  {where} exited with code {code}")
        log = details.get("log")
        if isinstance(log, str) and log.strip():
            self.out.print("  last lines of its log:")
            for line in log.rstrip("\n").splitlines()[-LOG_TAIL_LINES:]:
                self.out.print(f"    [dim]│[/dim] {escape(line)}", soft_wrap=True)
        self.out.print("  nothing was registered")


def _build_recipe(recipe: str, *, force: bool) -> None:
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

        info, cached = ImageBuilder(settings, progress).build(recipe, force=force)
        if not cached:
            console.print(
                f"  [green]✓[/green] {status.status} ({time.monotonic() - last[0]:.1f} s)"
            )
    verdict = "up to date (cache hit)" if cached else f"built in {time.monotonic() - started:.1f} s"
    console.print(f"image [bold]{info.name}[/bold] {info.image_hash}: {verdict}")
    console.print(f"  {info.directory}")


def default_name(ref: str) -> str:
    """An image name from a reference: its last path part, without tag or digest."""
    text = ref
    for transport in ("docker://", "oci-archive:", "docker-archive:", "oci:"):
        text = text.removeprefix(transport)
    text = text.split("@", 1)[0].rstrip("/")
    last = text.rsplit("/", 1)[-1]
    last = last.split(":", 1)[0]
    for suffix in (".tar.gz", ".tgz", ".tar"):
        last = last.removesuffix(suffix)
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "-", last).lstrip("._-")[:64]
    return cleaned or "imported"


def _local_ref(ref: str) -> str:
    """A local reference's path made absolute (the server's working directory differs)."""
    for transport in ("oci-archive:", "docker-archive:", "oci:"):
        if ref.startswith(transport):
            rest = ref[len(transport) :]
            path, sep, tag = rest.partition(":") if transport == "oci:" else (rest, "", "")
            if path and not path.startswith("/"):
                return f"{transport}{os.path.abspath(path)}{sep}{tag}"
    return ref


@app.command("import")
def import_(
    ref: Annotated[
        str,
        typer.Argument(
            help="docker://HOST/REPO:TAG, HOST:PORT/REPO:TAG, oci:DIR[:TAG], oci-archive:FILE "
            "or docker-archive:FILE (files: the server's).",
            show_default=False,
        ),
    ],
    tag: Annotated[
        str | None,
        typer.Option("--tag", "-t", help="Image name (default: from REF).", show_default=False),
    ] = None,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Import an OCI image (through a running server)."""
    name = tag or default_name(ref)
    started = time.monotonic()

    def show(event: BuildEvent) -> None:
        if event.kind == "progress":
            console.print(f"  [dim]· {escape(event.message or '')}[/dim]")

    with clean_errors():
        info = Images.import_(_local_ref(ref), name=name, on_event=show, url=url, api_key=api_key)
    console.print(
        f"image [bold]{escape(info.name)}[/bold] {info.image_hash}: imported in "
        f"{time.monotonic() - started:.1f} s; {info.size_bytes / 2**20:.0f} MiB on disk"
    )


def _table(images: list[ImageInfo]) -> Table:
    table = Table("NAME", "SHARED", "BASE", "SIZE", "LAYERS", "CREATED (UTC)", "USED BY")
    for i in images:
        used = [*i.usage.sandboxes, *i.usage.snapshots]
        table.add_row(
            i.name + (" (default)" if i.default else ""),
            "yes" if i.shared else "",
            i.base or i.created_by,
            f"{i.size_bytes / 2**20:.0f} MiB",
            str(len(i.layers)),
            i.created_at.strftime("%Y-%m-%d %H:%M"),
            ", ".join(used[:3]) + (f" +{len(used) - 3}" if len(used) > 3 else ""),
        )
    return table


@app.command("list")
def list_images(
    as_json: Json = False,
    local: Annotated[
        bool, typer.Option("--local", help="Read this host's registry (no server needed).")
    ] = False,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """List the images (through a running server; --local: this host's shared ones)."""
    if local:
        _list_local(as_json)
        return
    with clean_errors():
        images = Images.list(url=url, api_key=api_key)
    if as_json:
        typer.echo(json.dumps([i.model_dump(mode="json") for i in images], indent=2))
        return
    if not images:
        console.print("no images yet: run `emberbox image build`")
        return
    print_table(console, _table(images))


def _list_local(as_json: bool) -> None:
    images = ImageRegistry(load_settings()).list_all()
    if as_json:
        rows = [
            {
                "name": i.name,
                "tenant": i.tenant,
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
    table = Table("name", "tenant", "hash", "kernel", "disk used", "built")
    for i in images:
        table.add_row(
            i.name,
            i.tenant or "",
            i.image_hash,
            i.kernel_release,
            f"{i.size_bytes / 2**20:.0f} MiB",
            i.created_at.strftime("%Y-%m-%d %H:%M"),
        )
    console.print(table)


@app.command("rm")
def rm(
    names: Annotated[list[str], typer.Argument(help="Image names.", show_default=False)],
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Delete images (refused while a sandbox or snapshot uses one)."""
    with clean_errors():
        for image in names:
            freed = Images.delete(image, url=url, api_key=api_key)
            console.print(f"deleted {escape(image)} ({freed / 2**20:.0f} MiB freed)")
