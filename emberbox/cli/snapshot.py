"""``emberbox snapshot list|rm``: the snapshots of a running server, through the SDK.

Take one with ``emberbox sandbox snapshot ID``; fork from it with
``emberbox sandbox create --snapshot SNAPSHOT_ID``.
"""

from __future__ import annotations

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
from emberbox.sdk import SnapshotInfo, Snapshots

app = typer.Typer(help="List and delete snapshots through a running server", no_args_is_help=True)

_out = Console()

SnapshotId = Annotated[str, typer.Argument(help="Snapshot id", show_default=False)]


def _table(infos: list[SnapshotInfo]) -> Table:
    table = Table("ID", "SANDBOX", "IMAGE", "VCPUS", "MEMORY", "SIZE", "CREATED (UTC)")
    for info in infos:
        table.add_row(
            info.id,
            info.sandbox_id,
            info.image,
            str(info.vcpus),
            f"{info.memory_mib} MiB",
            f"{info.size_bytes / 2**20:.0f} MiB",
            info.created_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
    return table


@app.command("list")
def list_(
    sandbox_id: Annotated[
        str | None,
        typer.Option("--sandbox", help="Only snapshots of this sandbox", show_default=False),
    ] = None,
    as_json: Json = False,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """List snapshots, oldest first."""
    with clean_errors():
        if sandbox_id is not None:
            sandbox_id = ids.sandbox_id(sandbox_id, url, api_key)
        infos = Snapshots.list(sandbox_id, url=url, api_key=api_key)
    if as_json:
        print_json("[" + ",".join(i.model_dump_json() for i in infos) + "]")
    else:
        print_table(_out, _table(infos), whole=2)


@app.command()
def rm(snapshot_id: SnapshotId, url: Url = None, api_key: ApiKey = None) -> None:
    """Delete a snapshot and its files (refused while a sandbox forked from it runs)."""
    with clean_errors():
        snapshot_id = ids.snapshot_id(snapshot_id, url, api_key)
        Snapshots.delete(snapshot_id, url=url, api_key=api_key)
    err_console.print(f"deleted {snapshot_id}", markup=False)
