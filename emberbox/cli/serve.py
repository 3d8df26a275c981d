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
from emberbox.cli.common import clean_errors
from emberbox.config import Settings
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
) -> None:
    """Serve the sandbox API (OpenAPI docs at /docs) until interrupted."""
    overrides: dict[str, Any] = {"host": host, "port": port}
    settings = Settings(**{name: value for name, value in overrides.items() if value is not None})
    logs.configure(settings.log_format)
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
    # Our middleware logs each request (with its id and duration): no uvicorn access log.
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
    )


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
