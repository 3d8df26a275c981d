"""What routes get injected: the settings, the sandbox manager, the image registry and
the tenancy service (who calls: :mod:`emberbox.api.auth`).

They live on ``app.state.emberbox`` (one :class:`AppContext` per app), never in module
globals, so several apps (tests) can run side by side.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from emberbox import errors
from emberbox.config import Settings
from emberbox.service.sandboxes.state import SandboxState

if TYPE_CHECKING:
    from emberbox.service.catalog import ImageRegistry
    from emberbox.service.guestio.files import SandboxFiles
    from emberbox.service.guestio.processes import Processes
    from emberbox.service.sandboxes.manager import SandboxManager
    from emberbox.service.tenancy.access import Tenancy

METADATA_PREFIX = "metadata."


@dataclass(frozen=True)
class AppContext:
    settings: Settings
    manager: SandboxManager
    registry: ImageRegistry
    tenancy: Tenancy


def get_context(connection: HTTPConnection) -> AppContext:
    context = connection.app.state.emberbox
    assert isinstance(context, AppContext)
    return context


def get_settings(connection: HTTPConnection) -> Settings:
    return get_context(connection).settings


def get_manager(connection: HTTPConnection) -> SandboxManager:
    return get_context(connection).manager


def get_registry(connection: HTTPConnection) -> ImageRegistry:
    return get_context(connection).registry


def get_processes(connection: HTTPConnection) -> Processes:
    return get_context(connection).manager.processes


def get_files(connection: HTTPConnection) -> SandboxFiles:
    return get_context(connection).manager.files


def require_api_key(connection: HTTPConnection) -> None:
    """(WebSocket routes, once accepted) raise what ``auth.authorize_websocket`` found
    at the handshake: Unauthorized, RateLimited, or NotFound for another tenant's id.
    A connection it never saw is refused."""
    error = getattr(connection.state, "auth_error", None)
    if isinstance(error, errors.EmberboxError):
        raise error
    if getattr(connection.state, "principal", None) is None:
        raise errors.Unauthorized("the request was not authenticated")


def parse_metadata_filter(
    params: Iterable[tuple[str, str]], *, allowed: set[str]
) -> dict[str, str]:
    """``metadata.KEY=VALUE`` query parameters as ``{KEY: VALUE}``; other names are refused."""
    found: dict[str, str] = {}
    for name, value in params:
        if name in allowed:
            continue
        if not name.startswith(METADATA_PREFIX):
            raise errors.InvalidRequest(
                f"unknown query parameter {name!r}; filter with state= or metadata.KEY=VALUE"
            )
        key = name.removeprefix(METADATA_PREFIX)
        if not key:
            raise errors.InvalidRequest("empty metadata key in query parameter 'metadata.'")
        if key in found and found[key] != value:
            raise errors.InvalidRequest(f"metadata.{key} given twice with different values")
        found[key] = value
    return found


def refuse_unknown_params(names: Iterable[str], *, allowed: set[str]) -> None:
    """A misspelt filter is a 400, not a silently unfiltered list."""
    unknown = sorted(set(names) - allowed)
    if unknown:
        raise errors.InvalidRequest(
            f"unknown query parameter {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}"
        )


def state_from_name(name: str | None) -> SandboxState | None:
    """The service's state enum for a wire name (the schema already checked the name)."""
    return None if name is None else SandboxState(name)


SettingsDep = Annotated[Settings, Depends(get_settings)]
ManagerDep = Annotated["SandboxManager", Depends(get_manager)]
RegistryDep = Annotated["ImageRegistry", Depends(get_registry)]
ProcessesDep = Annotated["Processes", Depends(get_processes)]
FilesDep = Annotated["SandboxFiles", Depends(get_files)]
