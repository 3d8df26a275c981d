"""The seed's two endpoints (``POST /vm/create``, ``POST /exec/command``), kept
wire-compatible with the FastAPI service emberbox grew from."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StringConstraints

from emberbox.models.common import HostPath, PublicModel, RequestModel, ShellCommand


class VMCreate(RequestModel):
    """``POST /vm/create`` of the original FastAPI service."""

    name: Annotated[str, StringConstraints(max_length=1024)]
    user_id: Annotated[str, StringConstraints(max_length=1024)]
    root_image_path: HostPath | None = Field(
        default=None, description="Must be the rootfs of a registered image."
    )
    kernel_path: HostPath | None = Field(
        default=None, description="Must be the kernel (bzImage or vmlinux) of the same image."
    )


class VMCreateResponse(PublicModel):
    ip_address: str | None
    vm_id: str


class CommandRequest(RequestModel):
    """``POST /exec/command``: a shell command line."""

    vm_id: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    command: ShellCommand


class CommandResponse(PublicModel):
    success: bool = Field(description="exit_code == 0")
    output: str = Field(description="stdout followed by stderr")
    exit_code: int
