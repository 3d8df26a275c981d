"""``emberbox serve``: run the HTTP API with uvicorn."""

from __future__ import annotations

import logging
import sqlite3
from typing import Annotated, Any

import typer
import uvicorn

from emberbox import logs
from emberbox._version import __version__
from emberbox.api.app import create_app
from emberbox.api.serving import raise_fd_limit, uvicorn_options
from emberbox.cli.common import clean_errors
from emberbox.config import Settings
from emberbox.e2b.mount import urls as e2b_urls
from emberbox.errors import HostError
from emberbox.service.policy import check_serving
from emberbox.store import tenants
from emberbox.store.db import connect

log = logging.getLogger("emberbox.serve")


def serve(
    host: Annotated[
        str | None, typer.Option(help="Address to listen on (default: $EMBERBOX_HOST or 127.0.0.1)")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="TCP port (default: $EMBERBOX_PORT or 8080)")
    ] = None,
    cluster: Annotated[
        str | None,
        typer.Option(
            "--cluster",
            metavar="ADDRESS",
            help=(
                "Serve the API replica of the Ray cluster at ADDRESS (host:port of its "
                "head, or auto); needs EMBERBOX_DATABASE_URL (docs/cluster.md)"
            ),
        ),
    ] = None,
) -> None:
    """Serve the sandbox API (OpenAPI docs at /docs) until interrupted."""
    overrides: dict[str, Any] = {"host": host, "port": port, "cluster_address": cluster}
    settings = Settings(**{name: value for name, value in overrides.items() if value is not None})
    logs.configure(settings.log_format)
    if cluster is not None:
        from emberbox.cli.serve_cluster import serve_cluster

        serve_cluster(settings)
        return
    with clean_errors():
        for warning in check_serving(settings, db_keys=_active_keys(settings)):
            log.warning(warning)
    log.info(
        "emberbox %s on http://%s:%d (docs at /docs; data in %s; images in %s)",
        __version__,
        settings.host,
        settings.port,
        settings.data_dir,
        settings.images_dir,
    )
    api_url, sandbox_url = e2b_urls(f"http://{settings.host}:{settings.port}")
    # The two lines to paste (docs/e2b.md); under JSON logs, one log line that says them,
    # so that every line of the output still parses.
    if settings.log_format == "text":
        print(f"E2B_API_URL={api_url}\nE2B_SANDBOX_URL={sandbox_url}", flush=True)
    else:
        log.info("E2B_API_URL=%s E2B_SANDBOX_URL=%s", api_url, sandbox_url)
    soft, hard = raise_fd_limit()  # sockets of max_connections clients and the VMs' files
    if soft < 2 * settings.max_connections:
        log.warning(
            "open-file limit %d (hard %d) is low for max_connections=%d; raise it (ulimit -n)",
            soft,
            hard,
            settings.max_connections,
        )
    # Timeouts, the connection cap, proxy headers only from forwarded_allow_ips (serving.py).
    uvicorn.run(create_app(settings), **uvicorn_options(settings))


def _active_keys(settings: Settings) -> bool:
    """Whether the database holds an active API key (it is created if missing)."""
    try:
        conn = connect(settings.db_path)
    except (sqlite3.Error, OSError) as exc:
        raise HostError(f"cannot open the database {settings.db_path}: {exc}") from exc
    try:
        return tenants.any_active_key(conn)
    finally:
        conn.close()
