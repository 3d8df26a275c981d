"""The MCP tools driven by the ``mcp`` SDK's own client over both transports, against
one real ``emberbox serve`` over real VMs: stdio (``emberbox mcp`` in a subprocess) and
streamable HTTP (``/mcp`` on the server), with two tenants' keys and a wrong one."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client, ClientSession, MCPError, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import CallToolResult, TextContent

from emberbox.images.registry import ImageInfo
from tests.support.keys import make_key
from tests.support.paths import REPO, qemu_pids_under, short_tmp_dir
from tests.support.servers import Server, serve_emberbox

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]

ADMIN_KEY = "mcp-test-admin-key-0123456789abcdef"  # the server's own: the clean-up's key
CALL_WAIT_S = 600.0  # a create or a first run under TCG, on a busy host
CLI = "import sys; from emberbox.cli import main; sys.exit(main())"
TOOLS = {
    "create_sandbox",
    "list_sandboxes",
    "kill_sandbox",
    "run_code",
    "run_command",
    "read_file",
    "write_file",
    "list_files",
}


@dataclass(frozen=True)
class Keys:
    alice: str
    bob: str


@pytest.fixture(scope="module")
def server(default_image: ImageInfo, polyglot_image: ImageInfo) -> Iterator[Server]:
    """One server for the module, with an admin key of its own (for the clean-up)."""
    data_dir = short_tmp_dir("eb-mcp-")
    try:
        env = {"EMBERBOX_API_KEY": ADMIN_KEY, "EMBERBOX_POOL_SIZE": "0"}
        with serve_emberbox(data_dir, **env) as running:
            yield running
    finally:
        leftovers = qemu_pids_under(data_dir)
        for pid in leftovers:
            subprocess.run(["kill", "-9", str(pid)], check=False)
        shutil.rmtree(data_dir, ignore_errors=True)
        assert not leftovers, f"MCP tests left QEMU processes: {leftovers}"


@pytest.fixture(scope="module")
def keys(server: Server) -> Keys:
    """Two tenants' keys, made with ``emberbox keys create`` next to the running server."""
    data_dir = server.settings.data_dir
    return Keys(
        alice=make_key(data_dir, "--name", "alice"), bob=make_key(data_dir, "--name", "bob")
    )


@asynccontextmanager
async def stdio_session(server: Server, key: str) -> AsyncIterator[ClientSession]:
    """``emberbox mcp`` as a desktop host runs it: EMBERBOX_URL and EMBERBOX_API_KEY."""
    env = {**os.environ, "EMBERBOX_URL": server.url, "EMBERBOX_API_KEY": key}
    params = StdioServerParameters(
        command=sys.executable, args=["-c", CLI, "mcp"], env=env, cwd=str(REPO)
    )
    async with (
        stdio_client(params) as (read, write),
        ClientSession(read, write, read_timeout_seconds=CALL_WAIT_S) as session,
    ):
        await session.initialize()
        yield session


@asynccontextmanager
async def http_session(server: Server, key: str) -> AsyncIterator[ClientSession]:
    """The streamable-HTTP transport at ``/mcp``, with the key as a bearer token."""
    headers = {"Authorization": f"Bearer {key}"}
    timeout = httpx2.Timeout(30.0, read=CALL_WAIT_S)
    async with (
        httpx2.AsyncClient(headers=headers, timeout=timeout) as http,
        streamable_http_client(f"{server.url}/mcp", http_client=http) as (read, write),
        ClientSession(read, write, read_timeout_seconds=CALL_WAIT_S) as session,
    ):
        await session.initialize()
        yield session


@asynccontextmanager
async def modern_http_client(server: Server, key: str) -> AsyncIterator[Client]:
    """``/mcp`` as the SDK's high-level client speaks it: it probes ``server/discover``
    and adopts the 2026-07-28 protocol (one exchange per request, no initialize)."""
    headers = {"Authorization": f"Bearer {key}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0, read=CALL_WAIT_S)) as http,
        Client(streamable_http_client(f"{server.url}/mcp", http_client=http)) as client,
    ):
        yield client


async def call(session: ClientSession | Client, tool: str, **arguments: Any) -> dict[str, Any]:
    """The tool's structured answer; a tool error fails the test with its text."""
    result = await session.call_tool(tool, arguments)
    assert isinstance(result, CallToolResult)
    assert not result.is_error, _text(result)
    assert result.structured_content is not None
    return dict(result.structured_content)


async def call_error(session: ClientSession | Client, tool: str, **arguments: Any) -> str:
    """The text of the tool error the call must answer."""
    result = await session.call_tool(tool, arguments)
    assert isinstance(result, CallToolResult)
    assert result.is_error, result.structured_content
    return _text(result)


def _text(result: CallToolResult) -> str:
    return " ".join(item.text for item in result.content if isinstance(item, TextContent))


@pytest.mark.anyio
async def test_stdio_drives_a_sandbox(server: Server, keys: Keys) -> None:
    """Over stdio: the tools are listed with schemas; create, run python code (its exit
    code, output and time), run a command with cwd and env, write then read and list
    files (text and binary), kill; a killed sandbox's tools answer tool errors."""
    async with stdio_session(server, keys.alice) as session:
        listed = (await session.list_tools()).tools
        assert {tool.name for tool in listed} == TOOLS
        assert all(tool.description and tool.input_schema["type"] == "object" for tool in listed)

        created = await call(session, "create_sandbox", timeout_s=900)
        assert created["state"] == "running"
        sandbox_id = created["id"]

        code = "import sys\nprint(6 * 7)\nprint('oops', file=sys.stderr)\nsys.exit(3)\n"
        ran = await call(session, "run_code", language="python3", code=code, sandbox_id=sandbox_id)
        assert (ran["status"], ran["exit_code"]) == ("runtime_error", 3)
        assert (ran["stdout"], ran["stderr"]) == ("42\n", "oops\n")
        assert ran["time_ms"] > 0 and ran["sandbox_id"] == sandbox_id

        written = await call(
            session,
            "write_file",
            sandbox_id=sandbox_id,
            path="/work/data/hello.txt",
            content="hi\n",
        )
        assert written == {"path": "/work/data/hello.txt", "size": 3}
        read = await call(session, "read_file", sandbox_id=sandbox_id, path="/work/data/hello.txt")
        assert (read["content"], read["encoding"], read["size"]) == ("hi\n", "utf-8", 3)
        listing = await call(session, "list_files", sandbox_id=sandbox_id, path="/work/data")
        assert [(e["name"], e["type"], e["size"]) for e in listing["entries"]] == [
            ("hello.txt", "file", 3)
        ]
        command = "cat hello.txt; echo $GREETING; pwd"
        done = await call(
            session,
            "run_command",
            sandbox_id=sandbox_id,
            command=command,
            cwd="/work/data",
            env={"GREETING": "hey"},
        )
        assert (done["exit_code"], done["stdout"]) == (0, "hi\nhey\n/work/data\n")
        assert done["timed_out"] is False

        blob = bytes(range(256))
        packed = base64.b64encode(blob).decode()
        args = {"sandbox_id": sandbox_id, "path": "/work/blob.bin"}
        await call(session, "write_file", content=packed, encoding="base64", **args)
        assert "not UTF-8" in await call_error(session, "read_file", **args)
        back = await call(session, "read_file", encoding="base64", **args)
        assert base64.b64decode(back["content"]) == blob

        assert await call(session, "kill_sandbox", sandbox_id=sandbox_id) == {
            "id": sandbox_id,
            "killed": True,
        }
        gone = await call(session, "list_sandboxes", state="running")
        assert sandbox_id not in [s["id"] for s in gone["sandboxes"]]
        refused = await call_error(session, "run_command", sandbox_id=sandbox_id, command="true")
        assert refused.split(": ")[1] in ("Conflict", "NotFound"), refused


@pytest.mark.anyio
async def test_stdio_runs_code_in_a_fresh_sandbox(server: Server, keys: Keys) -> None:
    """run_code without a sandbox is one ``/v1/run`` (a fresh sandbox, gone after); the
    server's refusals come back as tool errors naming the error, not as crashes."""
    async with stdio_session(server, keys.alice) as session:
        ran = await call(session, "run_code", language="python3", code="print(6 * 7)")
        assert (ran["status"], ran["exit_code"], ran["stdout"]) == ("ok", 0, "42\n")
        assert ran["sandbox_id"] is None
        unknown = await call_error(session, "create_sandbox", image="no-such-image")
        assert "ImageNotFound" in unknown and "no-such-image" in unknown
        bad = await call_error(session, "run_code", language="cobol", code="")
        assert "language" in bad
        running = await call(session, "list_sandboxes", state="running")
        assert running == {"sandboxes": []}


@pytest.mark.anyio
async def test_http_refuses_a_missing_or_wrong_key(server: Server, keys: Keys) -> None:
    """``/mcp`` answers 401 with the API's error body before MCP sees the request, and
    the MCP client cannot even initialize with a wrong key."""
    hello = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    async with httpx.AsyncClient(base_url=server.url) as client:
        for headers in ({}, {"Authorization": "Bearer eb_wrong_key"}):
            answer = await client.post("/mcp", json=hello, headers=headers)
            assert answer.status_code == 401, answer.text
            assert answer.json()["error"]["type"] == "Unauthorized"
    with pytest.raises(ExceptionGroup) as refused:
        async with http_session(server, "eb_wrong_key"):
            pass
    # The SDK reports any error answer to initialize so, without the status.
    assert refused.group_contains(MCPError, match="error response")


@pytest.mark.anyio
async def test_http_tools_act_as_their_caller(server: Server, keys: Keys) -> None:
    """Over HTTP each tool acts with the caller's key: alice's sandbox runs her code and
    keeps her files; bob's client (the newer protocol) neither sees nor touches it
    (NotFound, as for an unknown id); the audit log names alice for what her tools did."""
    async with http_session(server, keys.alice) as alice:
        assert {tool.name for tool in (await alice.list_tools()).tools} == TOOLS
        sandbox_id = (await call(alice, "create_sandbox", timeout_s=900))["id"]
        try:
            code = "print(sum(range(10)))"
            ran = await call(
                alice, "run_code", language="python3", code=code, sandbox_id=sandbox_id
            )
            assert (ran["status"], ran["stdout"]) == ("ok", "45\n")
            mine = {"sandbox_id": sandbox_id, "path": "/tmp/secret.txt"}
            await call(alice, "write_file", content="alice's", **mine)
            assert (await call(alice, "read_file", **mine))["content"] == "alice's"

            async with modern_http_client(server, keys.bob) as bob:
                assert bob.session.protocol_version == "2026-07-28"
                seen = await call(bob, "list_sandboxes")
                assert sandbox_id not in [s["id"] for s in seen["sandboxes"]]
                for tool, args in (
                    ("read_file", mine),
                    ("write_file", {**mine, "content": "bob's"}),
                    ("run_command", {"sandbox_id": sandbox_id, "command": "true"}),
                    ("run_code", {"sandbox_id": sandbox_id, "language": "bash", "code": "true"}),
                    ("list_files", {"sandbox_id": sandbox_id}),
                    ("kill_sandbox", {"sandbox_id": sandbox_id}),
                ):
                    refused = await call_error(bob, tool, **args)
                    assert f"NotFound: no sandbox {sandbox_id}" in refused, (tool, refused)

            assert (await call(alice, "read_file", **mine))["content"] == "alice's"
            listed = await call(alice, "list_sandboxes", state="running")
            assert [s["id"] for s in listed["sandboxes"]] == [sandbox_id]
        finally:
            await call(alice, "kill_sandbox", sandbox_id=sandbox_id)

    async with server.async_client() as admin:
        entries = (await admin.get("/v1/audit", params={"tenant": "alice"})).json()["entries"]
    done = {(entry["action"], entry["target_id"], entry["outcome"]) for entry in entries}
    assert {("sandbox.create", sandbox_id, "ok"), ("sandbox.kill", sandbox_id, "ok")} <= done
    assert ("file.write", sandbox_id, "ok") in done
