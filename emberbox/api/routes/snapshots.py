"""Snapshots: take one of a sandbox, list, inspect and delete them.

New sandboxes are forked from a snapshot with ``POST /v1/sandboxes {"snapshot_id": ...}``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response

from emberbox.api import views
from emberbox.api.auth import PrincipalDep, scope_kwargs
from emberbox.api.deps import ManagerDep, refuse_unknown_params
from emberbox.api.errors import error_responses
from emberbox.api.routes.sandboxes import SandboxId
from emberbox.models import ObjectId, SnapshotList, SnapshotPublic

router = APIRouter(tags=["snapshots"])

SnapshotId = Annotated[str, Path(min_length=1, max_length=128, description="Snapshot id")]


@router.post(
    "/v1/sandboxes/{sandbox_id}/snapshots",
    status_code=201,
    response_model=SnapshotPublic,
    responses=error_responses(404, 409, 422, 502, 503),
)
async def take_snapshot(sandbox_id: SandboxId, manager: ManagerDep) -> SnapshotPublic:
    """Save a running sandbox's memory and disk; it keeps running. 409 unless running."""
    return views.snapshot_public(await manager.snapshot(sandbox_id))


@router.get("/v1/snapshots", response_model=SnapshotList, responses=error_responses(400, 422))
async def list_snapshots(
    request: Request,
    manager: ManagerDep,
    principal: PrincipalDep,
    sandbox_id: Annotated[
        ObjectId | None, Query(description="Only the snapshots taken of this sandbox")
    ] = None,
) -> SnapshotList:
    """Your snapshots (an admin key: everyone's), oldest first; filter by `sandbox_id=`."""
    refuse_unknown_params(request.query_params.keys(), allowed={"sandbox_id"})
    records = await manager.list_snapshots(sandbox_id, **scope_kwargs(principal))
    return SnapshotList(snapshots=[views.snapshot_public(r) for r in records])


@router.get(
    "/v1/snapshots/{snapshot_id}",
    response_model=SnapshotPublic,
    responses=error_responses(404, 422),
)
async def get_snapshot(snapshot_id: SnapshotId, manager: ManagerDep) -> SnapshotPublic:
    return views.snapshot_public(await manager.get_snapshot(snapshot_id))


@router.delete(
    "/v1/snapshots/{snapshot_id}",
    status_code=204,
    response_class=Response,
    responses=error_responses(404, 409, 422),
)
async def delete_snapshot(snapshot_id: SnapshotId, manager: ManagerDep) -> Response:
    """Delete a snapshot and its files. 409 while a live sandbox forked from it uses it."""
    await manager.delete_snapshot(snapshot_id)
    return Response(status_code=204)
