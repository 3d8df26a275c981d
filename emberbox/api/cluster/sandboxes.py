"""Sandboxes and snapshots as an API replica serves them (cluster mode).

What the index answers alone: lists, a snapshot's description, and a sandbox whose host
does not answer (``lost``). What a host answers, with the index kept in step: create
(placed here, or on the host holding the snapshot), get, kill, timeout, pause, resume,
snapshot, snapshot delete. Everything else under a sandbox is relayed (:mod:`.passthrough`).
"""

from __future__ import annotations

import logging
from typing import Annotated

import httpx
from fastapi import APIRouter, Path, Query, Request, Response

from emberbox import errors
from emberbox.api.auth import PrincipalDep, TenancyDep, scope_kwargs
from emberbox.api.cluster.context import ClusterContext, ClusterDep, passthrough, sandbox_path
from emberbox.api.deps import parse_metadata_filter, refuse_unknown_params
from emberbox.api.errors import error_responses
from emberbox.cluster.placement import place, with_placed
from emberbox.models import (
    ObjectId,
    SandboxCreate,
    SandboxList,
    SandboxPublic,
    SandboxStateName,
    SnapshotList,
    SnapshotPublic,
    TimeoutUpdate,
)
from emberbox.service.cluster_index import (
    differs,
    sandbox_public,
    snapshot_public,
    with_host_down,
)
from emberbox.service.sandboxes.reserved import RESERVED_PREFIX

log = logging.getLogger(__name__)
router = APIRouter(tags=["sandboxes"])

SandboxId = Annotated[str, Path(min_length=1, max_length=128, description="Sandbox id")]
SnapshotId = Annotated[str, Path(min_length=1, max_length=128, description="Snapshot id")]
JSON = "application/json"


@router.post(
    "/v1/sandboxes",
    status_code=201,
    response_model=SandboxPublic,
    responses=error_responses(400, 403, 404, 409, 422, 502, 503),
)
async def create_sandbox(
    body: SandboxCreate,
    request: Request,
    principal: PrincipalDep,
    tenancy: TenancyDep,
    cluster: ClusterDep,
) -> Response:
    """Place a sandbox on the host with the most room (or fork it on the host holding
    `snapshot_id`); 503 NoCapacity with Retry-After when every host is full."""
    if any(key.startswith(RESERVED_PREFIX) for key in body.metadata or {}):
        raise errors.InvalidRequest(f"metadata keys starting {RESERVED_PREFIX!r} are reserved")
    settings = cluster.settings
    if body.snapshot_id is not None:  # another tenant's snapshot is an unknown one
        await tenancy.check_owner(principal, "snapshot", body.snapshot_id)
        snapshot = await cluster.index.snapshot(body.snapshot_id)
        host, vcpus, memory_mib = snapshot.host, snapshot.vcpus, snapshot.memory_mib
        await cluster.index.check_quota(principal.tenant_id, vcpus, memory_mib)
        answer = await cluster.call(host, "POST", "/v1/sandboxes", await request.body())
    else:
        vcpus = body.vcpus or settings.default_vcpus
        memory_mib = body.memory_mib or settings.default_memory_mib
        image = body.image or settings.default_image
        await cluster.index.check_quota(principal.tenant_id, vcpus, memory_mib)
        host, answer = await _create_on_some_host(cluster, request, image, memory_mib)
    if answer.status_code != 201:
        return passthrough(answer)
    info = SandboxPublic.model_validate_json(answer.content)
    request.state.audit_target = info.id
    try:
        await cluster.index.record(info, host=str(host), tenant_id=principal.tenant_id)
    except BaseException:  # unindexed, nobody could reach it: do not leave it running
        await cluster.call(host, "DELETE", sandbox_path(info.id))
        raise
    return Response(answer.content, status_code=201, media_type=JSON)


async def _create_on_some_host(
    cluster: ClusterContext, request: Request, image: str, memory_mib: int
) -> tuple[str, httpx.Response]:
    """Place and forward the create; a host that turns it down for want of room (its
    own max_sandboxes, memory or disk: the placement's view of it was behind) is left
    out and the next best host asked, until none is left (NoCapacity, 503)."""
    body = await request.body()
    refused: set[str] = set()
    while True:
        hosts = with_placed(
            await cluster.cluster.hosts(), await cluster.index.live_by_host(), memory_mib
        )
        host = place(hosts, image=image, memory_mib=memory_mib, refused=refused)
        answer = await cluster.call(host, "POST", "/v1/sandboxes", body)
        if not host_was_full(answer):
            return host, answer
        log.info("host %s refused a create for want of room; placing it again", host)
        refused.add(host)


def host_was_full(answer: httpx.Response) -> bool:
    """A host's refusal for want of room (not for a bad request): its sandbox limit
    (403 QuotaExceeded; tenants' quotas are the replica's, never the host's), or no
    memory or disk left (503, 507)."""
    if answer.status_code in (503, 507):
        return True
    if answer.status_code != 403:
        return False
    try:
        kind = answer.json()["error"]["type"]
    except (ValueError, KeyError, TypeError):
        return False
    return bool(kind == "QuotaExceeded")


@router.get("/v1/sandboxes", response_model=SandboxList, responses=error_responses(400, 422))
async def list_sandboxes(
    request: Request,
    principal: PrincipalDep,
    cluster: ClusterDep,
    state: Annotated[SandboxStateName | None, Query(description="Only this state")] = None,
) -> SandboxList:
    """Your sandboxes on every host (an admin key: everyone's), from the index; filter by
    `state=` (`lost`: on a host that does not answer) and `metadata.KEY=VALUE`."""
    metadata = parse_metadata_filter(request.query_params.multi_items(), allowed={"state"})
    rows = await cluster.index.list(
        states=None if state is None else [state],
        metadata=metadata or None,
        **scope_kwargs(principal),
    )
    return SandboxList(sandboxes=[sandbox_public(row) for row in rows])


@router.get(
    "/v1/sandboxes/{sandbox_id}", response_model=SandboxPublic, responses=error_responses(404, 422)
)
async def get_sandbox(sandbox_id: SandboxId, cluster: ClusterDep) -> SandboxPublic | Response:
    """From its host; `lost` (from the index) while the host does not answer."""
    row = await cluster.index.sandbox(sandbox_id)
    try:
        answer = await cluster.call(row.host, "GET", sandbox_path(sandbox_id))
    except errors.HostDown:
        return sandbox_public(with_host_down(row))
    if answer.status_code == 404:  # the host restarted without it
        return sandbox_public(with_host_down(row))
    if answer.status_code != 200:
        return passthrough(answer)
    info = SandboxPublic.model_validate_json(answer.content)
    if differs(row, info):
        await cluster.index.refresh(info)
    return info


@router.delete(
    "/v1/sandboxes/{sandbox_id}",
    status_code=204,
    response_class=Response,
    responses=error_responses(404, 422, 502),
)
async def kill_sandbox(sandbox_id: SandboxId, cluster: ClusterDep) -> Response:
    """Kill a sandbox. On a host that does not answer it is marked stopped, and the host
    kills it when it comes back."""
    row = await cluster.index.sandbox(sandbox_id)
    try:
        answer = await cluster.call(row.host, "DELETE", sandbox_path(sandbox_id))
    except errors.HostDown:
        answer = None
    if answer is not None and answer.status_code not in (204, 404):
        return passthrough(answer)
    await cluster.index.set_state(sandbox_id, "stopped")
    return Response(status_code=204)


async def _sandbox_call(
    cluster: ClusterDep, sandbox_id: str, action: str, body: bytes | None = None
) -> Response:
    """A host call answered with the sandbox (timeout, pause, resume); the index follows."""
    row = await cluster.index.sandbox(sandbox_id)
    answer = await cluster.call(row.host, "POST", sandbox_path(sandbox_id, action), body)
    if answer.status_code != 200:
        return passthrough(answer)
    info = SandboxPublic.model_validate_json(answer.content)
    if differs(row, info):
        await cluster.index.refresh(info)
    return Response(answer.content, media_type=JSON)


@router.post(
    "/v1/sandboxes/{sandbox_id}/timeout",
    response_model=SandboxPublic,
    responses=error_responses(400, 404, 409, 422),
)
async def set_timeout(
    sandbox_id: SandboxId, body: TimeoutUpdate, request: Request, cluster: ClusterDep
) -> Response:
    """Kill the sandbox `timeout_s` seconds from now instead of at its current deadline."""
    return await _sandbox_call(cluster, sandbox_id, "timeout", await request.body())


@router.post(
    "/v1/sandboxes/{sandbox_id}/pause",
    response_model=SandboxPublic,
    responses=error_responses(404, 409, 422, 502),
)
async def pause_sandbox(sandbox_id: SandboxId, cluster: ClusterDep) -> Response:
    """Save a running sandbox to disk on its host; state `paused`."""
    return await _sandbox_call(cluster, sandbox_id, "pause")


@router.post(
    "/v1/sandboxes/{sandbox_id}/resume",
    response_model=SandboxPublic,
    responses=error_responses(403, 404, 409, 422, 502),
)
async def resume_sandbox(sandbox_id: SandboxId, cluster: ClusterDep) -> Response:
    """Restore a paused sandbox on its host; state `running`."""
    return await _sandbox_call(cluster, sandbox_id, "resume")


# -- snapshots -------------------------------------------------------------------------------


@router.post(
    "/v1/sandboxes/{sandbox_id}/snapshots",
    status_code=201,
    response_model=SnapshotPublic,
    responses=error_responses(403, 404, 409, 422, 502, 503),
)
async def take_snapshot(sandbox_id: SandboxId, cluster: ClusterDep) -> Response:
    """Save a running sandbox on its host; forks of it are created on that host."""
    row = await cluster.index.sandbox(sandbox_id)
    await cluster.index.check_snapshot_quota(row.tenant_id)
    answer = await cluster.call(row.host, "POST", sandbox_path(sandbox_id, "snapshots"))
    if answer.status_code != 201:
        return passthrough(answer)
    info = SnapshotPublic.model_validate_json(answer.content)
    await cluster.index.record_snapshot(info, host=str(row.host), tenant_id=row.tenant_id)
    return Response(answer.content, status_code=201, media_type=JSON)


@router.get("/v1/snapshots", response_model=SnapshotList, responses=error_responses(400, 422))
async def list_snapshots(
    request: Request,
    principal: PrincipalDep,
    cluster: ClusterDep,
    sandbox_id: Annotated[
        ObjectId | None, Query(description="Only the snapshots taken of this sandbox")
    ] = None,
) -> SnapshotList:
    """Your snapshots on every host (an admin key: everyone's), oldest first."""
    refuse_unknown_params(request.query_params.keys(), allowed={"sandbox_id"})
    rows = await cluster.index.snapshots(sandbox_id, **scope_kwargs(principal))
    return SnapshotList(snapshots=[snapshot_public(row) for row in rows])


@router.get(
    "/v1/snapshots/{snapshot_id}", response_model=SnapshotPublic, responses=error_responses(404)
)
async def get_snapshot(snapshot_id: SnapshotId, cluster: ClusterDep) -> SnapshotPublic:
    return snapshot_public(await cluster.index.snapshot(snapshot_id))


@router.delete(
    "/v1/snapshots/{snapshot_id}",
    status_code=204,
    response_class=Response,
    responses=error_responses(404, 409, 422, 503),
)
async def delete_snapshot(snapshot_id: SnapshotId, cluster: ClusterDep) -> Response:
    """Delete a snapshot on its host (503 HostDown while the host does not answer)."""
    row = await cluster.index.snapshot(snapshot_id)
    path = f"/v1/snapshots/{snapshot_id}"
    answer = await cluster.call(row.host, "DELETE", path)
    if answer.status_code not in (204, 404):
        return passthrough(answer)
    await cluster.index.forget_snapshot(snapshot_id)
    return Response(status_code=204)
