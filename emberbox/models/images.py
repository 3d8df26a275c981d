"""Images: build events (NDJSON lines of ``POST /v1/images``), the registry's records,
and the import request. Shared by the service (which emits events), the API and the SDK."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from datetime import datetime
from typing import Any, Literal

from pydantic import Field

from emberbox.models.common import ImageName, PublicModel, RequestModel

BuildEventKind = Literal["step", "log", "done", "error", "progress"]
StepState = Literal["cached", "running", "done", "failed"]


@dataclass(frozen=True)
class BuildEvent:
    """One thing a build (or an import) reports; one NDJSON line on the wire.

    - ``step``: a Dockerfile step changed state (``step`` index from 1, ``instruction``,
      ``state``; ``seconds`` once done/failed; ``exit_code`` when a RUN failed)
    - ``log``: output of the running step (``log`` text)
    - ``progress``: a free-form line (imports, template making)
    - ``done``: the image is registered (``image`` name)
    - ``error``: the build failed (``message``, ``error``: the error's type; ``exit_code``
      and ``log`` tail of the failing step when it was a RUN); nothing was registered
    """

    kind: BuildEventKind
    step: int | None = None
    total: int | None = None  # how many steps the Dockerfile has
    instruction: str | None = None
    state: StepState | None = None
    seconds: float | None = None
    log: str | None = None
    exit_code: int | None = None
    image: str | None = None
    message: str | None = None
    error: str | None = None  # an error event's type (ImageBuildError, QuotaExceeded ...)

    def to_dict(self) -> dict[str, Any]:
        """Only the fields that are set (a compact NDJSON line)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> BuildEvent:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


class ImageLayer(PublicModel):
    digest: str
    size: int = Field(ge=0)
    step: str = ""


class ImageUsage(PublicModel):
    sandboxes: list[str] = Field(default_factory=list, description="Live sandboxes of it.")
    snapshots: list[str] = Field(default_factory=list, description="Snapshots made from it.")


class ImageDetail(PublicModel):
    """A registered image, as ``GET /v1/images/{name}`` reports it."""

    name: str
    shared: bool = Field(description="The operator's image (every tenant sees it).")
    size_bytes: int
    created_at: datetime
    base: str = ""
    created_by: str = "recipe"
    image_hash: str
    layers: list[ImageLayer] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    workdir: str = ""
    user: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    cmd: list[str] | None = None
    userland: str = "emberbox"
    kernel_release: str | None = None
    default: bool = False
    usage: ImageUsage = Field(default_factory=ImageUsage)


class ImageImportRequest(RequestModel):
    ref: str = Field(min_length=1, max_length=2048, description="OCI reference to import.")
    name: ImageName


class ImageDeleted(PublicModel):
    name: str
    freed_bytes: int = Field(ge=0, description="Bytes of blobs collected by this delete.")
