"""``emberbox serve --cluster ADDRESS``: serve the API replica of a Ray cluster.

Needs ``EMBERBOX_DATABASE_URL`` (the cluster's PostgreSQL: keys, tenants, audit log and
the sandbox index) and Ray (``pip install 'emberbox[cluster]'``). Connects to the cluster
first (a clear message when it cannot), then serves until interrupted and disconnects.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio
import uvicorn

from emberbox._version import __version__
from emberbox.api.cluster import create_cluster_app
from emberbox.api.serving import uvicorn_options
from emberbox.cli.common import clean_errors, fail
from emberbox.config import Settings
from emberbox.service.policy import check_serving
from emberbox.store import tenants
from emberbox.store.database import open_database

log = logging.getLogger("emberbox.serve")


def serve_cluster(settings: Settings, *, run: Callable[..., None] = uvicorn.run) -> None:
    """Connect to ``settings.cluster_address`` and serve the replica (``run``: uvicorn's)."""
    if not settings.database_url.strip():
        fail(
            "--cluster needs the cluster's PostgreSQL: set "
            "EMBERBOX_DATABASE_URL=postgresql://USER:PASSWORD@HOST:PORT/DB (docs/cluster.md)"
        )
    try:
        import ray  # noqa: F401 - only to say what is missing
    except ModuleNotFoundError:
        fail("emberbox serve --cluster needs Ray: pip install 'emberbox[cluster]'")
    from emberbox.cluster.hosts import Cluster

    with clean_errors():
        with open_database(settings) as conn:  # reachable, migrated; keys there count
            db_keys = tenants.any_active_key(conn)
        for warning in check_serving(settings, db_keys=db_keys):
            log.warning(warning)
        cluster = anyio.run(Cluster.connect, settings)
    log.info(
        "emberbox %s API replica on http://%s:%d for the Ray cluster at %s",
        __version__,
        settings.host,
        settings.port,
        settings.cluster_address,
    )
    try:
        run(create_cluster_app(settings, cluster), **uvicorn_options(settings))
    finally:
        anyio.run(cluster.close)
