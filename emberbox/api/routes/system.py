"""``/healthz`` and ``/v1/images``."""

from __future__ import annotations

import anyio.to_thread
from fastapi import APIRouter, Depends

from emberbox._version import __version__
from emberbox.api import views
from emberbox.api.auth import authenticate
from emberbox.api.deps import ManagerDep, RegistryDep, SettingsDep
from emberbox.api.errors import error_responses
from emberbox.models import Health, ImagePublic
from emberbox.service.sandboxes.state import LIVE_STATES

router = APIRouter(tags=["system"])


@router.get("/healthz", response_model=Health)
async def healthz(manager: ManagerDep) -> Health:
    """Liveness, version and how many sandboxes are live (creating or running)."""
    # Only live rows, found through the state index: at most max_sandboxes of them, so
    # the answer costs the same however many ended sandboxes the store remembers.
    live = 0
    for state in sorted(LIVE_STATES):
        live += len(await manager.list(state=state))
    return Health(version=__version__, sandboxes=live)


@router.get(
    "/v1/images",
    response_model=list[ImagePublic],
    dependencies=[Depends(authenticate)],
    responses=error_responses(401, 429),
)
async def list_images(registry: RegistryDep, settings: SettingsDep) -> list[ImagePublic]:
    """Registered guest images."""
    infos = await anyio.to_thread.run_sync(registry.list)
    return [views.image_public(info, default_name=settings.default_image) for info in infos]
