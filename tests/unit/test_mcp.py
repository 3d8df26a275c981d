"""The MCP tools without a VM: driven in-process by the ``mcp`` SDK's client against the
real app over a fake manager, the pure run plans, and ``/mcp``'s own authentication."""

from __future__ import annotations

import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from mcp import Client
from mcp_types import CallToolResult, TextContent
from pydantic import SecretStr
from typer.testing import CliRunner

from emberbox.api.mcp import loopback_url
from emberbox.cli import mcp as cli_mcp
from emberbox.config import Settings
from emberbox.mcp import Target, build_server
from emberbox.mcp import code as plans
from emberbox.sdk import CommandResult
from tests.support.fakes_manager import fake_app
from tests.support.servers import serving


@pytest.fixture
def anyio_backend() -> str:
    """Run async tests on asyncio only."""
    return "asyncio"


@pytest.fixture
def url(tmp_path: Path) -> Iterator[str]:
    """The real app over a fake manager, served on a free port."""
    app, _ = fake_app(tmp_path)
    with serving(app) as served:
        yield served


@pytest.fixture
async def client(url: str) -> AsyncIterator[Client]:
    """An MCP client connected in-process to the tools, whose SDK calls go to ``url``."""
    async with Client(build_server(lambda _ctx: Target(url=url))) as connected:
        yield connected


async def _call(client: Client, tool: str, **arguments: Any) -> CallToolResult:
    result = await client.call_tool(tool, arguments)
    assert isinstance(result, CallToolResult)
    return result


def _text(result: CallToolResult) -> str:
    return " ".join(item.text for item in result.content if isinstance(item, TextContent))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.anyio
async def test_tools_map_to_sdk_calls(client: Client) -> None:
    """Each tool is its SDK calls, answered as structured content: create, a command,
    code compiled then run in the sandbox, files written (parents made), read, listed,
    and kill."""
    created = await _call(client, "create_sandbox", image="python", timeout_s=60)
    assert created.structured_content is not None
    sandbox_id = created.structured_content["id"]
    assert created.structured_content["state"] == "running"

    ran = (
        await _call(client, "run_command", sandbox_id=sandbox_id, command="echo hi")
    ).structured_content
    assert ran is not None and ran["stdout"] == f"ran echo hi in {sandbox_id}\n"

    code = (
        await _call(client, "run_code", sandbox_id=sandbox_id, language="c", code="int main(){}")
    ).structured_content
    assert code is not None and code["status"] == "ok"
    assert code["compile_output"].startswith("ran gcc -O2 -std=gnu17 -o main main.c -lm")
    assert code["stdout"] == f"ran ./main in {sandbox_id}\n"

    where = {"sandbox_id": sandbox_id, "path": "/a/b/c.txt"}
    assert (await _call(client, "write_file", content="x", **where)).structured_content == {
        "path": "/a/b/c.txt",
        "size": 1,
    }
    read = (await _call(client, "read_file", **where)).structured_content
    assert read == {"path": "/a/b/c.txt", "encoding": "utf-8", "content": "x", "size": 1}
    listed = (
        await _call(client, "list_files", sandbox_id=sandbox_id, path="/a/b")
    ).structured_content
    assert listed is not None and [e["name"] for e in listed["entries"]] == ["c.txt"]

    killed = await _call(client, "kill_sandbox", sandbox_id=sandbox_id)
    assert killed.structured_content == {"id": sandbox_id, "killed": True}


@pytest.mark.anyio
async def test_server_errors_are_tool_errors(client: Client) -> None:
    """A refusal of the server is a tool error naming its class and message; arguments
    outside a tool's schema are refused before any call."""
    unknown = await _call(client, "kill_sandbox", sandbox_id="sb-nope")
    assert unknown.is_error and "NotFound: no sandbox 'sb-nope'" in _text(unknown)
    bad_id = await _call(client, "run_command", sandbox_id="../x", command="true")
    assert bad_id.is_error and "InvalidRequest: not a sandbox id" in _text(bad_id)
    cobol = await _call(client, "run_code", language="cobol", code="")
    assert cobol.is_error and "language" in _text(cobol)
    bad_base64 = await _call(
        client, "write_file", sandbox_id="sb-1", path="/x", content="%%", encoding="base64"
    )
    assert bad_base64.is_error and "not valid base64" in _text(bad_base64)


@pytest.mark.anyio
async def test_an_unreachable_server_is_a_tool_error() -> None:
    """No server at the target: a HostError naming the URL, not a crash of the MCP server."""
    url = f"http://127.0.0.1:{_closed_port()}"
    async with Client(build_server(lambda _ctx: Target(url=url))) as client:
        result = await _call(client, "list_sandboxes")
    assert result.is_error and f"HostError: cannot reach emberbox at {url}" in _text(result)


def test_code_plans_and_their_outcomes() -> None:
    """Compiled languages compile then run in their own directory; the outcome takes
    /v1/run's statuses."""
    plan = plans.plan("c++", "ab12")
    assert plan.work_dir == "/tmp/mcp-run-ab12"
    assert plan.source_path == "/tmp/mcp-run-ab12/main.cpp"
    assert plan.compile_argv is not None and plan.compile_argv[0] == "g++"
    assert plan.run_argv == ["./main"]
    assert plans.plan("python3", "x").compile_argv is None
    assert set(plans.LANGUAGES) == {"python3", "bash", "node", "c", "c++"}

    def result(exit_code: int, **extra: Any) -> CommandResult:
        return CommandResult(exit_code=exit_code, stdout="o", stderr="e", duration_ms=5.0, **extra)

    failed = plans.judge("sb-1", result(1), None)
    assert (failed.status, failed.exit_code, failed.compile_output) == ("compile_error", None, "oe")
    assert plans.judge("sb-1", None, result(0)).status == "ok"
    assert plans.judge("sb-1", None, result(2)).status == "runtime_error"
    assert plans.judge("sb-1", None, result(0, output_truncated=True)).status == "output_limit"
    assert plans.judge("sb-1", None, result(137, timed_out=True)).status == "timeout"


def test_loopback_url() -> None:
    """Tools call back the address the request came in on; a wildcard bind is loopback."""
    settings = Settings(host="0.0.0.0", port=8123)
    assert loopback_url({"server": ("10.0.0.5", 8080)}, settings) == "http://10.0.0.5:8080"
    assert loopback_url({"server": ("::1", 8080)}, settings) == "http://[::1]:8080"
    assert loopback_url({"server": None}, settings) == "http://127.0.0.1:8123"


@pytest.mark.anyio
async def test_mcp_endpoint_authenticates_before_mcp(tmp_path: Path) -> None:
    """``/mcp`` refuses a missing or wrong key with the API's 401 body; outside the app's
    lifespan an authenticated request is a 503, not a crash."""
    settings = Settings(
        data_dir=tmp_path / "data", cache_dir=tmp_path / "cache", api_key=SecretStr("k" * 32)
    )
    app, _ = fake_app(tmp_path, settings)
    transport = httpx.ASGITransport(app=app)
    ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            refused = await http.post("/mcp", json=ping, headers=headers)
            assert refused.status_code == 401
            assert refused.json()["error"]["type"] == "Unauthorized"
        idle = await http.post("/mcp", json=ping, headers={"Authorization": "Bearer " + "k" * 32})
    assert idle.status_code == 503 and idle.json()["error"]["type"] == "HostError"


def test_emberbox_mcp_without_the_mcp_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the `mcp` package, `emberbox mcp` says what to install and exits 1."""
    for name in [name for name in sys.modules if name.split(".")[0] == "mcp"]:
        monkeypatch.setitem(sys.modules, name, None)
    for name in [name for name in sys.modules if name.startswith("emberbox.mcp")]:
        monkeypatch.delitem(sys.modules, name)
    app = typer.Typer()
    app.command()(cli_mcp.mcp)
    result = CliRunner().invoke(app, [])
    assert result.exit_code == 1
    assert "pip install 'emberbox[mcp]'" in result.output
