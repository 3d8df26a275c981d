"""The SDK and the ``emberbox sandbox`` CLI against the real server over real VMs."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from emberbox import errors
from emberbox.images.registry import ImageInfo
from emberbox.sdk import AsyncSandbox, Sandbox
from tests.support.paths import REPO
from tests.support.servers import Server, serve_emberbox

pytestmark = [pytest.mark.vm]


@pytest.fixture
def anyio_backend() -> str:
    """Run async tests on asyncio only."""
    return "asyncio"


@pytest.fixture
def server(
    data_dir: Path, default_image: ImageInfo, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Server]:
    """A real server; its URL is also EMBERBOX_URL for the SDK and the CLI."""
    with serve_emberbox(data_dir) as running:
        monkeypatch.setenv("EMBERBOX_URL", running.url)
        monkeypatch.delenv("EMBERBOX_API_KEY", raising=False)
        yield running


def test_sync_sdk_runs_python_in_a_vm(server: Server) -> None:
    """with Sandbox.create() as sb: python3 prints 42; leaving the block kills the VM."""
    with Sandbox.create(metadata={"test": "sync"}) as sb:
        assert sb.commands.run("python3 -c 'print(6*7)'").stdout == "42\n"
        result = sb.commands.run(
            ["sh", "-c", "cat; echo $X >&2; exit 5"], stdin="in", env={"X": "x"}
        )
        assert (result.stdout, result.stderr, result.exit_code) == ("in", "x\n", 5)
        assert sb.info().state == "running"
        assert [s.id for s in Sandbox.list(metadata={"test": "sync"})] == [sb.id]
    handle = Sandbox.connect(sb.id)
    assert handle.info().state == "stopped"
    handle.close()
    assert not (server.settings.vms_dir / sb.id).exists()


@pytest.mark.anyio
async def test_async_sdk_runs_python_in_a_vm(server: Server) -> None:
    """async with AsyncSandbox.create(): the same, through the async client."""
    async with await AsyncSandbox.create() as sb:
        result = await sb.commands.run("python3 -c 'print(6*7)'")
        assert result.stdout == "42\n"
        timed_out = await sb.commands.run("sleep 30", timeout_s=1)
        assert timed_out.timed_out
    handle = await AsyncSandbox.connect(sb.id)
    assert (await handle.info()).state == "stopped"
    await handle.close()


def test_sdk_raises_the_servers_errors(server: Server) -> None:
    """Server errors arrive as the same classes: ImageNotFound, NotFound, Conflict."""
    with pytest.raises(errors.ImageNotFound) as missing:
        Sandbox.create("no-such-image")
    assert "default" in missing.value.available
    with pytest.raises(errors.NotFound):
        Sandbox.connect("no-such-sandbox")
    sb = Sandbox.create()
    sb.kill()
    with pytest.raises(errors.Conflict):
        sb.commands.run("true")
    sb.close()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", "import sys; from emberbox.cli import main; sys.exit(main())"]
    return subprocess.run(
        [*command, "sandbox", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_cli_manages_sandboxes(server: Server) -> None:
    """emberbox sandbox create/exec/list/kill work end to end; exec exits with the code."""
    created = _cli("create", "--json", "--metadata", "via=cli")
    assert created.returncode == 0, created.stderr
    sandbox_id = json.loads(created.stdout)["id"]
    ran = _cli("exec", sandbox_id, "echo out; echo err >&2; exit 7")
    assert (ran.returncode, ran.stdout, ran.stderr) == (7, "out\n", "err\n")
    listed = json.loads(_cli("list", "--json", "--metadata", "via=cli").stdout)
    assert [s["id"] for s in listed] == [sandbox_id]
    assert _cli("kill", sandbox_id).returncode == 0
    missing = _cli("get", "no-such-sandbox")
    assert missing.returncode != 0
    assert missing.stderr.count("\n") == 1
    assert "Traceback" not in missing.stderr
