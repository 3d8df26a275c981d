"""``/v1/images``: build from a Dockerfile, import an OCI image, list, inspect, delete.

A build's body is the context as a tar (``application/x-tar``, optionally gzipped),
capped at ``build_context_max_bytes`` (413, up front when it has a Content-Length);
its answer streams :class:`~emberbox.models.images.BuildEvent` lines (NDJSON) and ends
with a ``done`` or an ``error`` event. A caller's image lands in its tenant's namespace
(the built-in tenant's: the operator's shared one); a tenant sees its own images and
the shared ones, never another tenant's.
"""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request

from emberbox import errors
from emberbox.api import views
from emberbox.api.auth import PrincipalDep
from emberbox.api.deps import ManagerDep, RegistryDep, SettingsDep, get_settings
from emberbox.api.errors import error_responses
from emberbox.api.routes.processes import RAW_BODY, content_length
from emberbox.api.streams import (
    NDJSON,
    StreamedResponse,
    Write,
    ndjson_response,
    streamed_content,
)
from emberbox.models.common import ImageName
from emberbox.models.images import (
    BuildEvent,
    ImageDeleted,
    ImageDetail,
    ImageImportRequest,
)
from emberbox.service.images.jobs import (
    DEFAULT_DOCKERFILE,
    ImageJobs,
    receive_context,
    remove_context,
)
from emberbox.service.images.registry_service import ImageCatalogService

router = APIRouter(tags=["images"])

ImageNamePath = Annotated[ImageName, Path(description="Image name")]
BUILD_EVENTS = streamed_content(NDJSON, {"$ref": "#/components/schemas/BuildEvent"})
MAX_BUILD_ARGS = 256


def _catalog(
    settings: SettingsDep, manager: ManagerDep, registry: RegistryDep
) -> ImageCatalogService:
    return ImageCatalogService(settings, registry, manager)


CatalogDep = Annotated[ImageCatalogService, Depends(_catalog)]


def _jobs(request: Request, manager: ManagerDep) -> ImageJobs:
    """One ImageJobs per app (builds share its locks)."""
    jobs = getattr(request.app.state, "image_jobs", None)
    if not isinstance(jobs, ImageJobs):
        jobs = ImageJobs(get_settings(request), manager)
        request.app.state.image_jobs = jobs
    return jobs


def _build_args(values: list[str]) -> dict[str, str]:
    if len(values) > MAX_BUILD_ARGS:
        raise errors.InvalidRequest(f"at most {MAX_BUILD_ARGS} build args", field="build_arg")
    args = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise errors.InvalidRequest(f"build_arg {value!r} must be KEY=VALUE", field="build_arg")
        args[key] = val
    return args


def _line(event: BuildEvent) -> bytes:
    return json.dumps(event.to_dict(), separators=(",", ":")).encode() + b"\n"


@router.post(
    "/v1/images",
    responses={**BUILD_EVENTS, **error_responses(400, 409, 413, 422)},
    openapi_extra=RAW_BODY,
    response_model=BuildEvent,
    response_class=StreamedResponse,
)
async def build_image(
    request: Request,
    principal: PrincipalDep,
    settings: SettingsDep,
    manager: ManagerDep,
    name: Annotated[ImageName, Query(description="The new image's name")],
    dockerfile: Annotated[
        str, Query(min_length=1, max_length=4096, description="Its path inside the context")
    ] = DEFAULT_DOCKERFILE,
    build_arg: Annotated[list[str] | None, Query(description="ARG values, KEY=VALUE")] = None,
    no_cache: Annotated[bool, Query(description="Run every step again")] = False,
) -> StreamedResponse:
    """Build image `name` from the Dockerfile in the context tar (the body); streams the
    build's events (NDJSON): each step's state and time, RUN output, then `done` or
    `error` (with the failed step's exit code and log tail; nothing is registered).
    A Dockerfile or context refused up front is a plain 400."""
    request.state.audit_target = name
    args = _build_args(build_arg or [])
    jobs = _jobs(request, manager)
    context = await receive_context(settings, request.stream(), content_length(request))
    try:
        text = await jobs.check_build(name, context, dockerfile, args)
    except BaseException:
        remove_context(context)
        raise

    async def produce(write: Write) -> None:
        failed = False

        async def on_event(event: BuildEvent) -> None:
            nonlocal failed
            failed = failed or event.kind == "error"
            await write(_line(event))

        try:
            await jobs.build(
                name=name,
                tenant_id=principal.tenant_id,
                context=context,
                dockerfile_text=text,
                build_args=args,
                no_cache=no_cache,
                on_event=on_event,
            )
        except errors.EmberboxError as exc:
            if not failed:
                error = type(exc).__name__
                await write(_line(BuildEvent("error", message=exc.message, error=error)))
        finally:
            remove_context(context)

    return ndjson_response(produce)


@router.post(
    "/v1/images/import",
    responses={**BUILD_EVENTS, **error_responses(400, 409, 422)},
    response_model=BuildEvent,
    response_class=StreamedResponse,
)
async def import_image(
    body: ImageImportRequest, request: Request, principal: PrincipalDep, manager: ManagerDep
) -> StreamedResponse:
    """Import an OCI image (`docker://host/repo:tag`, `host:port/repo:tag`; the operator
    also `oci:DIR[:tag]`, `oci-archive:FILE`, `docker-archive:FILE` of the server's
    files) as `name`; streams `progress` events, then `done` or `error`."""
    request.state.audit_target = body.name
    jobs = _jobs(request, manager)

    async def produce(write: Write) -> None:
        async def on_event(event: BuildEvent) -> None:
            await write(_line(event))

        try:
            await jobs.import_(
                ref=body.ref,
                name=body.name,
                tenant_id=principal.tenant_id,
                admin=principal.admin,
                on_event=on_event,
            )
        except errors.EmberboxError as exc:
            error = type(exc).__name__
            await write(_line(BuildEvent("error", message=exc.message, error=error)))

    return ndjson_response(produce)


@router.get("/v1/images", response_model=list[ImageDetail], responses=error_responses(400))
async def list_images(
    principal: PrincipalDep, settings: SettingsDep, catalog: CatalogDep
) -> list[ImageDetail]:
    """The images you can use: yours, then the operator's shared ones; with what of
    yours (an admin key: anyone's) uses each."""
    views_ = await catalog.list(principal.tenant_id, admin=principal.admin)
    return [views.image_detail(v, default_name=settings.default_image) for v in views_]


@router.get(
    "/v1/images/{name}", response_model=ImageDetail, responses=error_responses(400, 404, 422)
)
async def get_image(
    name: ImageNamePath, principal: PrincipalDep, settings: SettingsDep, catalog: CatalogDep
) -> ImageDetail:
    """One image (404 for a name you cannot see)."""
    view = await catalog.get(name, principal.tenant_id, admin=principal.admin)
    return views.image_detail(view, default_name=settings.default_image)


@router.delete(
    "/v1/images/{name}", response_model=ImageDeleted, responses=error_responses(404, 409, 422)
)
async def delete_image(
    name: ImageNamePath, request: Request, principal: PrincipalDep, catalog: CatalogDep
) -> ImageDeleted:
    """Delete your image (the operator: a shared one); 409 while a sandbox or snapshot
    uses it. Blobs nothing uses any more are collected."""
    request.state.audit_target = name
    freed = await catalog.delete(name, principal.tenant_id, admin=principal.admin)
    return ImageDeleted(name=name, freed_bytes=freed)
