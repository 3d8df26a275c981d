"""Every other sandbox- and snapshot-scoped route, relayed to the owning host.

The table is read from the native app's routers, so a route added there is relayed
here without code of its own: each (method, path) with ``{sandbox_id}`` or
``{snapshot_id}`` that :mod:`.sandboxes` does not answer itself. A route whose native
form takes a JSON body gets the same body model here: the replica validates it, caps
its size and authenticates before reading it (:mod:`emberbox.api.limits`), and the
audit log records its fields, as on a single server; raw bodies (file uploads, a
port's requests) stream through untouched.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from emberbox.api.cluster.context import ClusterContext, ClusterDep
from emberbox.api.limits import is_json_route
from emberbox.api.routes import files, ports, processes, sandboxes, snapshots

NATIVE_ROUTERS = (sandboxes.router, snapshots.router, processes.router, files.router, ports.router)
OWNED_PARAMS = ("sandbox_id", "snapshot_id")


@dataclass(frozen=True)
class Relayed:
    """One native route to relay: its path, methods and JSON body model (or None)."""

    path: str
    methods: frozenset[str]
    body: type[Any] | None


def relayed_routes(routes: list[Any], answered: set[tuple[str, str]]) -> Iterator[Relayed]:
    """The routes of ``routes`` scoped to a sandbox or snapshot, less the (method, path)
    pairs in ``answered``."""
    for route in routes:
        if not isinstance(route, APIRoute):
            continue
        if not any(f"{{{name}}}" in route.path for name in OWNED_PARAMS):
            continue
        methods = frozenset(m for m in route.methods or () if (m, route.path) not in answered)
        if not methods:
            continue
        field = route.body_field
        body = field.field_info.annotation if field is not None and is_json_route(route) else None
        yield Relayed(route.path, methods, body if isinstance(body, type) else None)


async def host_of(cluster: ClusterContext, params: dict[str, Any]) -> str | None:
    """The host of the sandbox (or snapshot) named in the path; NotFound if unknown."""
    if "sandbox_id" in params:
        return (await cluster.index.sandbox(str(params["sandbox_id"]))).host
    return (await cluster.index.snapshot(str(params["snapshot_id"]))).host


def endpoint_for(body: type[Any] | None) -> Callable[..., Awaitable[Response]]:
    """The relay endpoint; with a ``body`` model, one that declares it (FastAPI then
    parses and checks it; the bytes it read are what goes to the host)."""

    async def relay(request: Request, cluster: ClusterDep, **_: Any) -> Response:
        return await cluster.forward(request, await host_of(cluster, request.path_params))

    parameters = [
        inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Request),
        inspect.Parameter("cluster", inspect.Parameter.KEYWORD_ONLY, annotation=ClusterDep),
    ]
    if body is not None:
        parameters.append(
            inspect.Parameter("body", inspect.Parameter.KEYWORD_ONLY, annotation=body)
        )
    relay.__signature__ = inspect.Signature(parameters, return_annotation=Response)  # type: ignore[attr-defined]
    return relay


def relay_router(answered: set[tuple[str, str]]) -> APIRouter:
    """Relay routes for every native sandbox/snapshot route not in ``answered``."""
    router = APIRouter()
    for router_ in NATIVE_ROUTERS:
        for item in relayed_routes(router_.routes, answered):
            router.add_api_route(
                item.path,
                endpoint_for(item.body),
                methods=sorted(item.methods),
                include_in_schema=False,  # the single-host server's schema describes them
                response_class=Response,
            )
    return router


def answered_by(router: APIRouter) -> set[tuple[str, str]]:
    """The (method, path) pairs a router answers itself."""
    return {
        (method, route.path)
        for route in router.routes
        if isinstance(route, APIRoute)
        for method in route.methods or ()
    }
