"""The FastAPI app factory: routes, the error handlers and the manager's lifecycle."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from emberbox._version import __version__
from emberbox.api.auth import audited, authenticate, authorize_websocket, require_owner
from emberbox.api.deps import AppContext
from emberbox.api.errors import error_responses, install_error_handlers
from emberbox.api.limits import BodyGuard
from emberbox.api.mcp import McpEndpoint
from emberbox.api.metrics_listener import metrics_listener
from emberbox.api.observe import ObserveMiddleware
from emberbox.api.routes import (
    audit,
    compat,
    console,
    files,
    images,
    metrics,
    oneshot,
    ports,
    processes,
    pty,
    sandboxes,
    snapshots,
    system,
)
from emberbox.config import Settings
from emberbox.e2b.mount import mount as mount_e2b
from emberbox.service.catalog import ImageRegistry
from emberbox.service.sandboxes.manager import SandboxManager
from emberbox.service.sandboxes.scrape import scrape
from emberbox.service.tenancy.access import Tenancy


def create_app(
    settings: Settings,
    manager: SandboxManager | None = None,
    *,
    registry: ImageRegistry | None = None,
) -> FastAPI:
    """The HTTP API over one :class:`SandboxManager`.

    A manager passed in is the caller's to start and close; one built here (from
    ``settings``) is started and closed by the app's lifespan.
    """
    if registry is None:
        registry = ImageRegistry(settings)
    owned = manager is None
    if manager is None:
        manager = SandboxManager(settings, image_registry=registry)
    tenancy = Tenancy(settings)
    context = AppContext(settings=settings, manager=manager, registry=registry, tenancy=tenancy)
    mcp = McpEndpoint(settings)  # the MCP tools at /mcp; their sessions live in the lifespan

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(tenancy.close)
            if owned:
                await context.manager.start()
                stack.push_async_callback(context.manager.close)
            await stack.enter_async_context(mcp.running())
            if settings.metrics_bind:
                scraped = context.manager
                stack.enter_context(
                    metrics_listener(
                        settings.metrics_bind, lambda: scrape(scraped, settings.vms_dir)
                    )
                )
            yield

    app = FastAPI(
        title="emberbox",
        version=__version__,
        description="Run untrusted code in microVMs on your own host.",
        lifespan=lifespan,
    )
    app.state.emberbox = context
    app.add_middleware(BodyGuard, settings=settings)  # auth, then a bounded body
    app.add_middleware(ObserveMiddleware)  # outermost: logs every answer, early ones too
    install_error_handlers(app)
    # Who calls (401/429), the audit log, then the owner of any id in the path (404).
    guarded = [Depends(authenticate), Depends(audited, scope="function"), Depends(require_owner)]
    auth_errors = error_responses(401, 429)
    app.include_router(sandboxes.router, dependencies=guarded, responses=auth_errors)
    app.include_router(snapshots.router, dependencies=guarded, responses=auth_errors)
    app.include_router(processes.router, dependencies=guarded, responses=auth_errors)
    app.include_router(files.router, dependencies=guarded, responses=auth_errors)
    app.include_router(ports.router, dependencies=guarded, responses=auth_errors)
    app.include_router(ports.websocket_router, dependencies=[Depends(authorize_websocket)])
    app.include_router(ports.public_router)  # the URL's token stands in for a key
    # A WebSocket answers errors in frames after accepting: the check's outcome is kept
    # for the route's require_api_key().
    app.include_router(pty.router, dependencies=[Depends(authorize_websocket)])
    app.include_router(pty.ticket_router, dependencies=guarded, responses=auth_errors)
    app.include_router(compat.router, dependencies=guarded, responses=auth_errors)
    app.include_router(oneshot.router, dependencies=guarded, responses=auth_errors)
    app.include_router(audit.router, dependencies=guarded, responses=auth_errors)
    app.include_router(images.router, dependencies=guarded, responses=auth_errors)
    # Authenticated by the endpoint itself (a raw ASGI app: no dependencies), then MCP.
    app.router.routes.append(mcp.route())
    app.include_router(system.router)
    app.include_router(console.router)  # static files only: the page calls the API above
    app.include_router(metrics.router)
    mount_e2b(app, settings, manager, tenancy)  # the E2B front at /e2b (docs/e2b.md)
    return app


def app_from_env() -> FastAPI:
    """``uvicorn --factory emberbox.api.app:app_from_env``: settings from EMBERBOX_* vars."""
    return create_app(Settings())
