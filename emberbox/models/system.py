"""``/healthz`` and ``/v1/images``."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from emberbox.models.common import PublicModel


class ImagePublic(PublicModel):
    """A registered guest image."""

    name: str
    size_bytes: int
    created_at: datetime
    kernel_release: str | None = None
    default: bool = Field(default=False, description="Used when a request names no image.")


class Health(PublicModel):
    status: Literal["ok"] = "ok"
    version: str
    sandboxes: int = Field(description="Live sandboxes (creating or running).")
