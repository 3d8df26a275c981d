"""``GET /metrics``: Prometheus' text format, for admin keys (docs/observability.md)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from emberbox import errors
from emberbox.api.auth import PrincipalDep
from emberbox.api.deps import ManagerDep, SettingsDep
from emberbox.service.sandboxes.scrape import scrape

router = APIRouter(tags=["system"])

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


# Not in the OpenAPI document: it is for Prometheus, not API clients (docs/observability.md).
@router.get("/metrics", response_class=Response, include_in_schema=False)
async def prometheus_metrics(
    principal: PrincipalDep, manager: ManagerDep, settings: SettingsDep
) -> Response:
    """Sandboxes by state and image, creates by path and their latency, exec and one-shot
    latency, errors by type, the warm pool, VMM memory, reaper actions, refusals and HTTP
    requests. 401 for a key that is not an admin's."""
    if not principal.admin:
        raise errors.Unauthorized("metrics need an admin key (emberbox keys create --admin)")
    return Response(await scrape(manager, settings.vms_dir), media_type=CONTENT_TYPE)
