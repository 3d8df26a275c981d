"""The API replica's app factory: ``emberbox serve --cluster ADDRESS`` (docs/cluster.md).

The same layers as the single-host app (:mod:`emberbox.api.app`): the request id and
closing log line, auth before the body and the body limits, the error handlers, and
``authenticate`` / ``audited`` / ``require_owner`` on every guarded route, with tenants,
keys, the audit log and the sandbox index in the shared store (PostgreSQL). Sandboxes
run on the hosts; the replica holds no state of its own but its terminal tickets and
rate limits, so replicas can be added, removed and restarted at will.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, cast

import anyio
from fastapi import Depends, FastAPI

from emberbox._version import __version__
from emberbox.api.auth import audited, authenticate, authorize_websocket, require_owner
from emberbox.api.cluster import passthrough, sandboxes, sockets, system
from emberbox.api.cluster.context import ClusterContext, HostDirectory
from emberbox.api.cluster.proxy import HostProxy
from emberbox.api.deps import AppContext
from emberbox.api.errors import error_responses, install_error_handlers
from emberbox.api.limits import BodyGuard
from emberbox.api.observe import ObserveMiddleware
from emberbox.api.routes import audit
from emberbox.cluster.monitor import HostIndex, HostMonitor
from emberbox.config import Settings
from emberbox.service.cluster_index import SandboxIndex
from emberbox.service.tenancy.access import Tenancy

if TYPE_CHECKING:
    from emberbox.service.catalog import ImageRegistry
    from emberbox.service.sandboxes.manager import SandboxManager

MONITOR_INTERVAL_S = 5.0  # how often this replica checks the hosts (lost within 30 s)


def create_cluster_app(
    settings: Settings, cluster: HostDirectory, *, monitor_interval_s: float | None = None
) -> FastAPI:
    """The HTTP API over the hosts of ``cluster`` (the caller's to connect and close).

    The lifespan opens the shared store and runs the host monitor (``HostMonitor``:
    hosts down -> their sandboxes ``lost``; hosts back -> reconciled) every
    ``monitor_interval_s`` (None: :data:`MONITOR_INTERVAL_S`; 0: no monitor, for tests
    that run their own).
    """
    tenancy = Tenancy(settings)
    index = SandboxIndex(settings, tenancy)
    proxy = HostProxy()
    context = ClusterContext(settings=settings, cluster=cluster, index=index, proxy=proxy)
    interval_s = MONITOR_INTERVAL_S if monitor_interval_s is None else monitor_interval_s

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(tenancy.close)
            stack.push_async_callback(proxy.close)
            store = await tenancy.store()  # opened (and migrated) before the first request
            async with anyio.create_task_group() as tg:
                if interval_s > 0:
                    tg.start_soon(_monitor, store, cluster, interval_s)
                yield
                tg.cancel_scope.cancel()

    app = FastAPI(
        title="emberbox (cluster)",
        version=__version__,
        description="Run untrusted code in microVMs on a cluster of hosts.",
        lifespan=lifespan,
    )
    # The auth dependencies find the tenancy service here; the cluster routes never
    # use a manager or registry (there is none on a replica).
    app.state.emberbox = AppContext(
        settings=settings,
        manager=cast("SandboxManager", None),
        registry=cast("ImageRegistry", None),
        tenancy=tenancy,
    )
    app.state.cluster = context
    app.add_middleware(BodyGuard, settings=settings)
    app.add_middleware(ObserveMiddleware)
    install_error_handlers(app)
    guarded: list[Any] = [
        Depends(authenticate),
        Depends(audited, scope="function"),
        Depends(require_owner),
    ]
    auth_errors = error_responses(401, 429)
    app.include_router(sandboxes.router, dependencies=guarded, responses=auth_errors)
    app.include_router(sockets.ticket_router, dependencies=guarded, responses=auth_errors)
    answered = passthrough.answered_by(sandboxes.router) | passthrough.answered_by(
        sockets.ticket_router
    )
    app.include_router(passthrough.relay_router(answered), dependencies=guarded)
    app.include_router(sockets.router, dependencies=[Depends(authorize_websocket)])
    app.include_router(system.router, dependencies=guarded, responses=auth_errors)
    app.include_router(audit.router, dependencies=guarded, responses=auth_errors)
    app.include_router(system.open_router)
    return app


async def _monitor(store: HostIndex, cluster: HostDirectory, interval_s: float) -> None:
    """The host monitor of this replica (idempotent across replicas)."""
    await HostMonitor(store, cluster).run(interval_s)
