"""The cluster's admin API (``emberbox serve --cluster``; docs/cluster.md): its hosts and
draining one. Imported as ``emberbox.models.cluster``; admin keys only."""

from __future__ import annotations

from pydantic import Field

from emberbox.models.common import PublicModel, RequestModel


class HostPublic(PublicModel):
    """One VM host of the cluster, as the API replica sees it now. Never its address or
    key: those stay between the replica and the host."""

    name: str
    alive: bool = Field(description="False when the host's node or server does not answer.")
    draining: bool = Field(description="True: no new sandboxes are placed on it.")
    sandboxes: int = Field(description="Sandboxes running on it (0 when it is down).")
    max_sandboxes: int = Field(description="Its server's max_sandboxes.")
    free_memory_mib: int = Field(description="MemAvailable of the machine, in MiB.")
    images: list[str] = Field(default_factory=list, description="Images it holds.")


class HostList(PublicModel):
    hosts: list[HostPublic]


class DrainRequest(RequestModel):
    """Drain a host (no new sandboxes on it; those it holds keep running) or undo that."""

    drain: bool = Field(description="True: drain; false: take new sandboxes again.")
