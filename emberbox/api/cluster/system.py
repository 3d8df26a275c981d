"""The rest of a replica's API: health, one-shot runs, images and languages (from a
host), the cluster's admin routes, and what cluster mode does not serve.

- ``POST /v1/run`` is placed like a create (on the run image, the default memory) and
  relayed: the host creates, runs and kills the sandbox.
- ``GET /v1/languages``, ``GET /v1/images[/{name}]``: any host that answers (each host
  keeps its own images; ``GET /v1/cluster/hosts`` says which has which).
- ``GET /v1/cluster/hosts``, ``POST /v1/cluster/hosts/{name}/drain``: admin keys only
  (401 otherwise, as ``/v1/audit`` and ``/metrics``).
- Not served (501 ``NotServedInCluster``, naming what to do instead): image builds,
  imports and deletes (run them on each host), public port URLs, the E2B front, MCP,
  the console, the seed's ``/vm/create`` and ``/exec/command``, ``/metrics``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import JSONResponse

from emberbox import errors
from emberbox._version import __version__
from emberbox.api.auth import PrincipalDep
from emberbox.api.cluster.context import ClusterDep
from emberbox.api.errors import count_error, error_response, error_responses
from emberbox.cluster.placement import place, with_placed
from emberbox.models import Health
from emberbox.models.cluster import DrainRequest, HostList, HostPublic
from emberbox.models.oneshot import RunRequest, RunResponse

router = APIRouter()  # guarded: authenticate, audited, require_owner
open_router = APIRouter()  # no key: health, and the refusals

HostName = Annotated[str, Path(min_length=1, max_length=63, description="Host name")]
NOT_SERVED = 501
NOT_SERVED_TYPE = "NotServedInCluster"
ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
# Path prefix -> what to do instead.
UNSERVED: dict[str, str] = {
    "/e2b": "the E2B front is served by single-host servers only",
    "/mcp": "run `emberbox mcp` (stdio) against the cluster API instead",
    "/console": "the browser console is served by single-host servers only",
    "/vm": "use POST /v1/sandboxes",
    "/exec": "use POST /v1/sandboxes/{id}/exec",
    "/metrics": "scrape each host's metrics_bind, and the replica's logs",
    "/v1/ports": "public port URLs are not served in cluster mode; use an API key",
}
UNSERVED_IMAGES = (
    "image builds, imports and deletes are run on each host "
    "(`emberbox image build` there, or its own API), not through the cluster API"
)


@open_router.get("/healthz", response_model=Health)
async def healthz(cluster: ClusterDep) -> Health:
    """Liveness, version and the live sandboxes of the whole cluster (from the index)."""
    return Health(version=__version__, sandboxes=await cluster.index.live_count())


@router.post("/v1/run", response_model=RunResponse, responses=error_responses(400, 403, 422, 503))
async def run(
    body: RunRequest, request: Request, principal: PrincipalDep, cluster: ClusterDep
) -> Response:
    """Compile (if needed) and run a program in a fresh sandbox on the host with most
    room (see the single-host `POST /v1/run`)."""
    settings = cluster.settings
    memory_mib = settings.default_memory_mib
    await cluster.index.check_quota(principal.tenant_id, settings.default_vcpus, memory_mib)
    hosts = with_placed(
        await cluster.cluster.hosts(), await cluster.index.live_by_host(), memory_mib
    )
    host = place(hosts, image=settings.run_image, memory_mib=memory_mib)
    return await cluster.forward(request, host)


@router.get("/v1/languages")
async def languages(request: Request, cluster: ClusterDep) -> Response:
    """The languages `POST /v1/run` accepts (as a host answers)."""
    return await cluster.forward(request, await cluster.any_alive_host())


@router.get("/v1/images")
async def list_images(request: Request, cluster: ClusterDep) -> Response:
    """The images of a host that answers."""
    return await cluster.forward(request, await cluster.any_alive_host())


@router.get("/v1/images/{name}")
async def get_image(request: Request, cluster: ClusterDep) -> Response:
    return await cluster.forward(request, await cluster.any_alive_host())


@router.api_route("/v1/images", methods=["POST"], include_in_schema=False)
@router.api_route("/v1/images/import", methods=["POST"], include_in_schema=False)
@router.api_route("/v1/images/{name}", methods=["DELETE"], include_in_schema=False)
async def images_not_served() -> JSONResponse:
    return not_served(UNSERVED_IMAGES)


@router.get("/v1/cluster/hosts", response_model=HostList, responses=error_responses(401))
async def list_hosts(principal: PrincipalDep, cluster: ClusterDep) -> HostList:
    """Every host: alive, draining, sandboxes and capacity, free memory, images."""
    require_admin(principal.admin)
    hosts = await cluster.cluster.hosts()
    return HostList(
        hosts=[
            HostPublic(
                name=host.name,
                alive=host.alive,
                draining=host.draining,
                sandboxes=host.sandboxes,
                max_sandboxes=host.max_sandboxes,
                free_memory_mib=host.free_memory_mib,
                images=list(host.images),
            )
            for host in sorted(hosts, key=lambda h: h.name)
        ]
    )


@router.post(
    "/v1/cluster/hosts/{name}/drain",
    response_model=HostList,
    responses=error_responses(401, 404, 422, 503),
)
async def drain_host(
    name: HostName, body: DrainRequest, principal: PrincipalDep, cluster: ClusterDep
) -> HostList:
    """Drain a host (`{"drain": true}`: no new sandboxes there; its own keep running) or
    open it again (`false`). Answers every host, as `GET /v1/cluster/hosts`."""
    require_admin(principal.admin)
    await cluster.cluster.drain(name, body.drain)
    return await list_hosts(principal, cluster)


def require_admin(admin: bool) -> None:
    if not admin:
        raise errors.Unauthorized(
            "the cluster's hosts need an admin key (emberbox keys create --admin)"
        )


def not_served(what: str) -> JSONResponse:
    """501: cluster mode does not serve this route."""
    count_error(NOT_SERVED_TYPE)
    return error_response(NOT_SERVED, NOT_SERVED_TYPE, f"not served in cluster mode: {what}")


def _refusal(what: str) -> Callable[[], Awaitable[JSONResponse]]:
    async def refuse() -> JSONResponse:
        return not_served(what)

    return refuse


for _prefix, _what in UNSERVED.items():
    for _path in (_prefix, f"{_prefix}/{{rest:path}}"):
        open_router.add_api_route(
            _path,
            _refusal(_what),
            methods=ALL_METHODS,
            include_in_schema=False,
        )
