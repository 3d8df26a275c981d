"""The FastAPI app factory: routes, the error handlers and the manager's lifecycle."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from emberbox import __version__
from emberbox.api.deps import AppContext, require_api_key
from emberbox.api.errors import error_responses, install_error_handlers
from emberbox.api.routes import files, processes, pty, sandboxes, seed, snapshots, system
from emberbox.api.routes.run import router as run_router
from emberbox.config import Settings
from emberbox.images.registry import ImageRegistry
from emberbox.service.manager import SandboxManager


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
    context = AppContext(settings=settings, manager=manager, registry=registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not owned:
            yield
            return
        await context.manager.start()
        try:
            yield
        finally:
            await context.manager.close()

    app = FastAPI(
        title="emberbox",
        version=__version__,
        description="Run untrusted code in microVMs on your own host.",
        lifespan=lifespan,
    )
    app.state.emberbox = context
    install_error_handlers(app)
    guarded = [Depends(require_api_key)]
    auth_errors = error_responses(401)
    app.include_router(sandboxes.router, dependencies=guarded, responses=auth_errors)
    app.include_router(snapshots.router, dependencies=guarded, responses=auth_errors)
    app.include_router(processes.router, dependencies=guarded, responses=auth_errors)
    app.include_router(files.router, dependencies=guarded, responses=auth_errors)
    app.include_router(pty.router)  # a WebSocket: checks the key itself, answers in frames
    app.include_router(seed.router, dependencies=guarded, responses=auth_errors)
    app.include_router(run_router, dependencies=guarded, responses=auth_errors)
    app.include_router(system.router)
    return app


def app_from_env() -> FastAPI:
    """``uvicorn --factory emberbox.api.app:app_from_env``: settings from EMBERBOX_* vars."""
    return create_app(Settings())
