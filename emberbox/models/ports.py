"""``/v1/sandboxes/{id}/ports/{port}``: a port of the sandbox and its public URL."""

from __future__ import annotations

from pydantic import Field

from emberbox.models.common import PublicModel, RequestModel


class PortUpdate(RequestModel):
    public: bool = Field(
        description="true: reachable without a key at `url` (an unguessable token); "
        "false: revoke that URL"
    )


class PortPublic(PublicModel):
    port: int = Field(ge=1, le=65535)
    public: bool
    url: str | None = Field(
        None, description="The public URL's path on this server (`/v1/ports/TOKEN/`), if public"
    )
    open_connections: int = Field(
        ge=0, description="Connections open to the sandbox's ports right now"
    )
