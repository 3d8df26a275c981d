"""Mounting the E2B front on the emberbox app: the control plane at ``/e2b``, envd (and
the code interpreter) at ``/e2b/envd`` — the two URLs ``emberbox serve`` prints."""

from __future__ import annotations

from fastapi import FastAPI

from emberbox.config import Settings
from emberbox.e2b import control, envd, interpreter, processes, watch
from emberbox.e2b.front import Front
from emberbox.service.sandboxes.manager import SandboxManager
from emberbox.service.tenancy.access import Tenancy

PREFIX = "/e2b"
ENVD_PREFIX = "/e2b/envd"


def mount(app: FastAPI, settings: Settings, manager: SandboxManager, tenancy: Tenancy) -> None:
    """Add the E2B routes to ``app`` (envd's first: the control plane ends with a
    catch-all that answers E2B's unsupported calls 501)."""
    app.state.e2b = Front(settings, manager, tenancy)
    for router in (envd.router, envd.fs_router, watch.router, processes.router, interpreter.router):
        app.include_router(router, prefix=ENVD_PREFIX)
    app.include_router(control.router, prefix=PREFIX)


def urls(base: str) -> tuple[str, str]:
    """``(E2B_API_URL, E2B_SANDBOX_URL)`` of a server at ``base`` (``http://h:8080``)."""
    base = base.rstrip("/")
    return f"{base}{PREFIX}", f"{base}{ENVD_PREFIX}"
