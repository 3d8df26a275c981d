"""Sandboxes on the wire: create one, describe it, give it a new lifetime."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from emberbox.models.common import (
    MAX_TIMEOUT_S,
    Env,
    ImageName,
    Metadata,
    ObjectId,
    PublicModel,
    RequestModel,
)

# The values of emberbox.service.sandboxes.state.SandboxState, as they travel on the wire
# ("lost": cluster mode only, the sandbox's host does not answer; docs/cluster.md).
SandboxStateName = Literal["creating", "running", "paused", "stopping", "stopped", "error", "lost"]

AllowEntry = Annotated[str, StringConstraints(min_length=1, max_length=300)]


class NetworkRequest(RequestModel):
    """A sandbox's network (docs/networking.md). Private, link-local and loopback ranges
    and the host's own addresses stay unreachable whatever ``allow`` says."""

    egress: Literal["none", "allowlist", "full"] = Field(
        default="none",
        description="`none`: no network; `allowlist`: only `allow`; `full`: the internet.",
    )
    allow: list[AllowEntry] = Field(
        default_factory=list,
        max_length=1024,
        description=(
            "With `allowlist`: IP, CIDR, IP:port, CIDR:port, host:port or host (a host name "
            "is resolved once, at create time). A port allows TCP and UDP to it."
        ),
    )


class SandboxCreate(RequestModel):
    """Ask for a new sandbox. Unset fields take the server's defaults (``Settings``)."""

    image: ImageName | None = Field(
        default=None,
        description="Image name; null uses the snapshot's, else the server default (`default`).",
    )
    vcpus: int | None = Field(
        default=None, ge=1, le=64, description="Virtual CPUs; null uses the server default (1)."
    )
    memory_mib: int | None = Field(
        default=None,
        ge=128,  # less does not boot the guest (service.validation.MIN_MEMORY_MIB)
        le=1_048_576,
        description="Guest memory in MiB; null uses the server default (512).",
    )
    timeout_s: int | None = Field(
        default=None,
        ge=1,
        le=MAX_TIMEOUT_S,
        description="Seconds until the sandbox is killed; null uses the server default (300).",
    )
    metadata: Metadata = Field(default_factory=dict, description="Labels to filter lists by.")
    env: Env = Field(default_factory=dict, description="Environment of every command run.")
    snapshot_id: ObjectId | None = Field(
        default=None,
        description=(
            "Fork from this snapshot instead of booting: the sandbox gets the snapshot's "
            "image, vcpus and memory_mib (giving different ones is a 409 SnapshotMismatch)."
        ),
    )
    network: NetworkRequest | None = Field(
        default=None,
        description="Null (the default): no network at all. Its address is `ip_address`.",
    )


class SandboxPublic(PublicModel):
    """A sandbox as the server describes it."""

    # Never the sandbox's env, VMM pid or work dir (emberbox.api.views.sandbox_public).
    id: str
    state: SandboxStateName
    image: str
    vcpus: int
    memory_mib: int
    timeout_s: int = Field(description="Lifetime in seconds, counted from the last update.")
    created_at: datetime
    expires_at: datetime
    ip_address: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    error: str | None = Field(default=None, description="Why the sandbox is in state `error`.")
    snapshot_id: str | None = Field(default=None, description="The snapshot it was forked from.")


class SandboxList(PublicModel):
    sandboxes: list[SandboxPublic]


class TimeoutUpdate(RequestModel):
    """Give a sandbox a new lifetime, counted from now."""

    timeout_s: int = Field(ge=1, le=MAX_TIMEOUT_S, description="Seconds from now.")
