"""``POST /v1/run`` (one program, compiled and run once in a fresh sandbox) and
``GET /v1/languages``. The work is :mod:`emberbox.service.oneshot.runner`'s."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, Depends, Request

from emberbox.api import views
from emberbox.api.auth import PrincipalDep, owner_kwargs
from emberbox.api.deps import RegistryDep, SettingsDep, get_context
from emberbox.api.errors import error_responses
from emberbox.models.oneshot import LanguageList, RunRequest, RunResponse
from emberbox.service.oneshot.runner import LanguageVersions, RunSpec, run_code

if TYPE_CHECKING:
    from emberbox.service.oneshot.runner import RunManager

router = APIRouter(tags=["run"])


def get_run_manager(request: Request) -> RunManager:
    manager: RunManager = get_context(request).manager
    return manager


def get_versions(request: Request) -> LanguageVersions:
    """One version cache per app (on ``app.state``, like the rest of the app's context)."""
    versions = getattr(request.app.state, "language_versions", None)
    if not isinstance(versions, LanguageVersions):
        versions = request.app.state.language_versions = LanguageVersions()
    return versions


RunManagerDep = Annotated["RunManager", Depends(get_run_manager)]
VersionsDep = Annotated[LanguageVersions, Depends(get_versions)]


@router.post(
    "/v1/run",
    response_model=RunResponse,
    responses=error_responses(400, 403, 422, 502, 503),
)
async def run(
    body: RunRequest, manager: RunManagerDep, settings: SettingsDep, principal: PrincipalDep
) -> RunResponse:
    """Compile (if needed) and run a program in a fresh sandbox, destroyed afterwards.

    The program's failures are answers (200 with `status`: `compile_error`,
    `runtime_error`, `timeout`, `memory_limit`, `output_limit`); an unknown language is a
    400 naming the languages.
    """
    spec = RunSpec(
        language=body.language,
        code=body.code,
        files=[(f.name, f.content) for f in body.files],
        stdin=body.stdin,
        args=body.args,
        timeout_s=body.timeout_s,
        memory_mib=body.memory_mib,
        tenant_id=owner_kwargs(principal).get("tenant_id"),  # its quotas count this run
    )
    return views.run_response(await run_code(manager, settings, spec))


@router.get("/v1/languages", response_model=LanguageList)
async def languages(
    manager: RunManagerDep, settings: SettingsDep, registry: RegistryDep, versions: VersionsDep
) -> LanguageList:
    """The languages `POST /v1/run` accepts, with the versions its image has (found out
    once per image build; null when the server cannot tell)."""
    found = await versions.languages(manager, settings, registry)
    return LanguageList(languages=[views.language_public(info) for info in found])
