"""``GET /v1/audit``: the audit log, newest first (admin keys only)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from emberbox import errors
from emberbox.api.auth import PrincipalDep, TenancyDep
from emberbox.api.deps import refuse_unknown_params
from emberbox.api.errors import error_responses
from emberbox.models import AuditEntryPublic, AuditList

router = APIRouter(tags=["audit"])

MAX_ENTRIES = 1000


@router.get("/v1/audit", response_model=AuditList, responses=error_responses(400, 422))
async def audit_log(
    request: Request,
    principal: PrincipalDep,
    tenancy: TenancyDep,
    tenant: Annotated[
        str | None, Query(max_length=128, description="Only this tenant's (name or id)")
    ] = None,
    action: Annotated[
        str | None, Query(max_length=64, description="Only this action (e.g. sandbox.exec)")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_ENTRIES, description="At most this many")] = 100,
) -> AuditList:
    """Who did what, when, and how it ended: creates, kills, execs, snapshots, file
    writes, process starts, key changes. 401 for a key that is not an admin's."""
    refuse_unknown_params(request.query_params.keys(), allowed={"tenant", "action", "limit"})
    if not principal.admin:
        raise errors.Unauthorized("the audit log needs an admin key (emberbox keys create --admin)")
    found = await tenancy.audit_log(tenant=tenant, action=action, limit=limit)
    return AuditList(
        entries=[
            AuditEntryPublic(
                id=entry.id or 0,
                at=entry.at,
                tenant=name,
                key_id=entry.key_id,
                action=entry.action,
                target_id=entry.target_id,
                detail=entry.detail,
                outcome=entry.outcome,
            )
            for entry, name in found
        ]
    )
