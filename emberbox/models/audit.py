"""The audit log (``GET /v1/audit``, admin keys only)."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from emberbox.models.common import PublicModel


class AuditEntryPublic(PublicModel):
    """Who (tenant, key) did what to which object, when, and how it ended."""

    id: int
    at: datetime
    tenant: str = Field(description="The caller's tenant name (its id if unknown)")
    key_id: str | None = Field(description="The key used; null in local mode")
    action: str = Field(description="e.g. sandbox.create, sandbox.exec, key.revoke")
    target_id: str | None = Field(description="The sandbox, snapshot or key acted on")
    detail: dict[str, object]
    outcome: str = Field(description="`ok`, or the error's type (NotFound, QuotaExceeded ...)")


class AuditList(PublicModel):
    entries: list[AuditEntryPublic]
