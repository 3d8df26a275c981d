"""``emberbox cluster``: the hosts of a Ray cluster (docs/cluster.md).

``host start`` / ``host stop`` run on a host machine after ``ray start`` (they register
or end that host's agent). Ray and the server's code are imported when a command runs,
so that this group lists without them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import ModuleType
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from emberbox.cli.common import ApiKey, Json, Url, clean_errors, fail, print_table
from emberbox.sdk import Cluster, HostInfo

app = typer.Typer(help="Cluster mode: VM hosts on Ray behind API replicas.", no_args_is_help=True)
host_app = typer.Typer(help="This machine's host agent.", no_args_is_help=True)
app.add_typer(host_app, name="host")

Address = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="Ray cluster address (default: $EMBERBOX_CLUSTER_ADDRESS, else the local cluster)",
        show_default=False,
    ),
]
Name = Annotated[
    str, typer.Option("--name", help="Host name (the node's resource emberbox_host_NAME)")
]


def _ray_address(address: str | None) -> str:
    return address or os.environ.get("EMBERBOX_CLUSTER_ADDRESS") or "auto"


def _env_pairs(pairs: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            fail(f"--env {pair!r}: expected NAME=VALUE")
        env[name] = value
    return env


def _hosts_module() -> ModuleType:
    try:
        import ray  # noqa: F401 - only to say what is missing
    except ModuleNotFoundError:
        fail("emberbox cluster needs Ray: pip install 'emberbox[cluster]'")
    from emberbox.cluster import hosts

    return hosts


@host_app.command("start")
def host_start(
    name: Name,
    data_dir: Annotated[
        Path, typer.Option("--data-dir", help="The host server's data dir (its SQLite, VMs)")
    ],
    address: Address = None,
    env: Annotated[
        list[str] | None,
        typer.Option("--env", help="NAME=VALUE for the host's server (EMBERBOX_* settings)"),
    ] = None,
    port: Annotated[int, typer.Option(help="The host server's port (0: a free one)")] = 0,
) -> None:
    """Start (or find running) this host's agent and its emberbox server."""
    hosts = _hosts_module()
    extra = _env_pairs(env or [])
    with clean_errors():
        hosts.check_name(name)
        hosts.connect_driver(_ray_address(address))
        hosts.start_host(name, data_dir.resolve(), env=extra, port=port)
        url = hosts.host_url(name)
    typer.echo(
        f"host {name}: actor {hosts.actor_name(name)} (namespace {hosts.NAMESPACE}) serves "
        f"{url} with data in {data_dir.resolve()}; Ray restarts it if it fails"
    )


@host_app.command("stop")
def host_stop(name: Name, address: Address = None) -> None:
    """End this host's agent for good (its server stops; its VMs keep running)."""
    hosts = _hosts_module()
    with clean_errors():
        hosts.connect_driver(_ray_address(address))
        hosts.stop_host(name)
    typer.echo(f"host {name}: stopped")


# Commands that talk to the API replicas (status, drain) follow below.

_console = Console(highlight=False)


def _hosts_table(hosts: list[HostInfo]) -> Table:
    table = Table("HOST", "ALIVE", "DRAINING", "SANDBOXES", "FREE MEMORY", "IMAGES")
    for host in hosts:
        table.add_row(
            host.name,
            "yes" if host.alive else "NO",
            "yes" if host.draining else "no",
            f"{host.sandboxes}/{host.max_sandboxes}",
            f"{host.free_memory_mib} MiB",
            ", ".join(host.images) or "-",
        )
    return table


@app.command("status")
def status(url: Url = None, api_key: ApiKey = None, json_out: Json = False) -> None:
    """The cluster's hosts: alive, draining, sandboxes, free memory, images.

    Asks an API replica (--url) with an admin key.
    """
    with clean_errors():
        hosts = Cluster.hosts(url=url, api_key=api_key)
    if json_out:
        typer.echo(json.dumps([host.model_dump() for host in hosts], indent=2))
        return
    print_table(_console, _hosts_table(hosts))


@app.command("drain")
def drain(
    name: Annotated[str, typer.Argument(help="Host name", show_default=False)],
    undo: Annotated[bool, typer.Option("--undo", help="Take new sandboxes again")] = False,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Stop placing new sandboxes on host NAME; --undo opens it again.

    Its sandboxes keep running. Asks an API replica (--url) with an admin key.
    """
    with clean_errors():
        hosts = Cluster.drain(name, not undo, url=url, api_key=api_key)
    typer.echo(f"host {name}: {'open again' if undo else 'draining'}")
    print_table(_console, _hosts_table(hosts))
