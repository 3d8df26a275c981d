"""The error body every failed request answers with (the classes are emberbox.errors')."""

from __future__ import annotations

from pydantic import Field

from emberbox.models.common import PublicModel


class ErrorDetail(PublicModel):
    type: str = Field(description="Class name in emberbox.errors, or ValidationError.")
    message: str
    image: str | None = Field(default=None, description="ImageNotFound: the name asked for.")
    available: list[str] | None = Field(default=None, description="ImageNotFound: known images.")
    console_tail: str | None = Field(default=None, description="VMMError: last console lines.")
    quota: str | None = Field(default=None, description="QuotaExceeded: the quota's name.")
    limit: int | None = Field(default=None, description="QuotaExceeded: the quota's value.")
    used: int | None = Field(default=None, description="QuotaExceeded: what is held now.")


class ErrorBody(PublicModel):
    """Every error response: ``{"error": {"type": ..., "message": ...}}``."""

    error: ErrorDetail
