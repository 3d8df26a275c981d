"""``/healthz`` (``/v1/images``: :mod:`.images`)."""

from __future__ import annotations

from fastapi import APIRouter

from emberbox._version import __version__
from emberbox.api.deps import ManagerDep
from emberbox.models import Health
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
