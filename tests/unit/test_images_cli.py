"""``emberbox image build|list|rm`` against a served app (real registry on a temp dir,
fake manager, the build engine replaced by a stand-in): steps with their state and time,
RUN output, a failed step's exit code and log tail with exit status 1 and no traceback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from emberbox import errors
from emberbox.api import create_app
from emberbox.cli.images import app, default_name
from emberbox.config import Settings
from emberbox.images.registry import FILE_NAMES, ImageRegistry, register_image
from emberbox.models.images import BuildEvent
from emberbox.service.images import build as engine
from tests.support.fakes_manager import FakeManager
from tests.support.servers import serving

runner = CliRunner()


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    settings = Settings(
        data_dir=tmp_path / "data",
        cache_dir=tmp_path / "cache",
        image_template_after_build=False,
        image_gc_grace_s=0,
    )
    staging = tmp_path / "stage"
    staging.mkdir()
    for name in FILE_NAMES.values():
        (staging / name).write_bytes(b"x")
    register_image(settings, "default", staging, {"image_hash": "h-default"}, tenant=None)
    registry = ImageRegistry(settings)
    server_app = create_app(settings, FakeManager(settings, registry), registry=registry)  # type: ignore[arg-type]
    with serving(server_app) as url:
        monkeypatch.setenv("EMBERBOX_URL", url)
        yield settings


def context(tmp_path: Path) -> Path:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM default\nRUN make\n")
    return ctx


def test_a_failed_step_shows_its_exit_code_and_log_tail(
    served: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def failing(deps: Any, request: Any, on_event: Any) -> Any:
        await on_event(BuildEvent("step", step=1, total=1, instruction="RUN make", state="running"))
        await on_event(BuildEvent("log", step=1, log="compiling\nerror: no rule"))
        await on_event(BuildEvent("log", step=1, log=" to make\n"))
        await on_event(
            BuildEvent(
                "step",
                step=1,
                total=1,
                instruction="RUN make",
                state="failed",
                seconds=1.5,
                exit_code=2,
            )
        )
        await on_event(
            BuildEvent(
                "error",
                step=1,
                exit_code=2,
                log="error: no rule to make\n",
                message="RUN make failed",
            )
        )
        raise errors.ImageBuildError("RUN make failed", step=1, exit_code=2)

    monkeypatch.setattr(engine, "build_image", failing)
    result = runner.invoke(app, ["build", "-t", "app", str(context(tmp_path))])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "[1/1] RUN make" in result.output
    assert "│ error: no rule to make" in result.output  # the partial lines joined
    assert "failed exit code 2 (1.5 s)" in result.output
    assert (
        "step 1 exited with code 2" in result.output and "nothing was registered" in result.output
    )


def test_build_list_and_rm(
    served: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def working(deps: Any, request: Any, on_event: Any) -> Any:
        staging = tmp_path / "built"
        staging.mkdir()
        for name in FILE_NAMES.values():
            (staging / name).write_bytes(b"y")
        manifest = {
            "image_hash": "h-app",
            "base": "default",
            "layers": [{"digest": "d", "size": 1, "step": "RUN make"}],
        }
        await on_event(BuildEvent("step", step=1, total=1, instruction="RUN make", state="cached"))
        info = register_image(served, request.name, staging, manifest, tenant=request.tenant)
        await on_event(BuildEvent("done", image=request.name))
        return info

    monkeypatch.setattr(engine, "build_image", working)
    built = runner.invoke(app, ["build", "-t", "app", str(context(tmp_path))])
    assert built.exit_code == 0, built.output
    assert "(cached)" in built.output and "all steps cached" in built.output
    listed = runner.invoke(app, ["list"])
    assert listed.exit_code == 0 and "app" in listed.output and "default" in listed.output
    removed = runner.invoke(app, ["rm", "app"])
    assert removed.exit_code == 0 and "deleted app" in removed.output
    again = runner.invoke(app, ["rm", "app"])
    assert again.exit_code != 0 and "Traceback" not in again.output


def test_names_from_references() -> None:
    assert default_name("docker://127.0.0.1:5000/team/app:1.2") == "app"
    assert default_name("oci-archive:/tmp/busybox.tar") == "busybox"
    assert default_name("oci:/srv/layout:v1") == "layout"
    assert default_name("host:5000/x@sha256:abc") == "x"
