"""The two endpoints of the FastAPI service emberbox grew from, kept wire-compatible.

``POST /vm/create`` took host paths to a rootfs and a kernel. Here a path is only
accepted when the image registry says it is that file of a registered image: the
server resolves it (through the registry) and never opens anything else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio.to_thread
from fastapi import APIRouter, Request

from emberbox import errors
from emberbox.agent_client.spec import ExecSpec
from emberbox.api import views
from emberbox.api.auth import PrincipalDep, TenancyDep, owner_kwargs
from emberbox.api.deps import ManagerDep, RegistryDep
from emberbox.api.errors import error_responses
from emberbox.models import CommandRequest, CommandResponse, VMCreate, VMCreateResponse
from emberbox.service.sandboxes.execs import run_command

if TYPE_CHECKING:
    from emberbox.service.catalog import ImageRegistry

router = APIRouter(tags=["seed (compatibility)"])

_ROLES = {"root_image_path": {"rootfs"}, "kernel_path": {"kernel", "vmlinux"}}


def image_for_paths(registry: ImageRegistry, paths: dict[str, str | None]) -> str | None:
    """The one registered image all given paths belong to; None when no path is given."""
    chosen: str | None = None
    for field, path in paths.items():
        if path is None:
            continue
        found = registry.find_by_path(path)
        roles = _ROLES[field]
        if found is None or found[1] not in roles:
            wanted = " or ".join(sorted(roles))
            raise errors.InvalidRequest(
                f"{field} {path!r} is not the {wanted} file of a registered image "
                f"(images: {', '.join(registry.names()) or 'none'}); omit it to use the default"
            )
        name: str = found[0].name
        if chosen is not None and name != chosen:
            raise errors.InvalidRequest(
                f"root_image_path and kernel_path belong to different images ({chosen!r}, {name!r})"
            )
        chosen = name
    return chosen


@router.post(
    "/vm/create",
    response_model=VMCreateResponse,
    responses=error_responses(400, 403, 422, 502, 503),
)
async def create_vm(
    body: VMCreate,
    request: Request,
    manager: ManagerDep,
    registry: RegistryDep,
    principal: PrincipalDep,
) -> VMCreateResponse:
    """Boot a sandbox; `name` and `user_id` become its metadata."""
    paths = {"root_image_path": body.root_image_path, "kernel_path": body.kernel_path}
    image = await anyio.to_thread.run_sync(image_for_paths, registry, paths)
    record = await manager.create(
        image=image,
        metadata={"name": body.name, "user_id": body.user_id},
        **owner_kwargs(principal),
    )
    request.state.audit_target = record.id
    return VMCreateResponse(ip_address=record.ip_address, vm_id=record.id)


@router.post(
    "/exec/command",
    response_model=CommandResponse,
    responses=error_responses(400, 404, 409, 422, 502, 504),
)
async def exec_command(
    body: CommandRequest, manager: ManagerDep, principal: PrincipalDep, tenancy: TenancyDep
) -> CommandResponse:
    """Run a shell command line; `output` is stdout followed by stderr."""
    await tenancy.check_owner(principal, "sandbox", body.vm_id)  # as an unknown id if not yours
    result = await run_command(manager, body.vm_id, ExecSpec(body.command))
    return views.command_response(result)
