"""The MCP tools: an :class:`MCPServer` (the official ``mcp`` SDK) whose tools call the
emberbox server through emberbox's own async SDK.

Every tool is one or a few SDK calls, so it goes through the same API as any client:
the same keys, quotas, rate limits, audit log and tenancy. Which server and which key a
call uses is a :class:`Target`, asked of a ``resolve`` function at each call:

- ``emberbox mcp`` (stdio, for desktop hosts): one fixed target, ``--url``/``--api-key``
  or ``$EMBERBOX_URL``/``$EMBERBOX_API_KEY``;
- ``/mcp`` on the server (streamable HTTP, :mod:`emberbox.api.mcp`): the key the HTTP
  request itself presented, so a tool acts exactly as its caller may.

A failure the server (or the SDK) reports is an :mod:`emberbox.errors` class; each tool
turns it into a tool error (``is_error``) reading ``"<Type>: <message>"``, which the
agent can act on. Anything else is a bug and the SDK reports it as such.
"""

from __future__ import annotations

import base64
import binascii
import posixpath
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Annotated, Literal

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations
from pydantic import Field

from emberbox import errors
from emberbox._version import __version__
from emberbox.mcp import code as plans
from emberbox.mcp.code import COMPILE_TIMEOUT_S, Language
from emberbox.mcp.results import (
    CodeResult,
    CommandOutput,
    FileContent,
    FileListing,
    FileWritten,
    SandboxKilled,
    SandboxListing,
    SandboxSummary,
    command_output,
    file_entry,
    oneshot_result,
    sandbox_summary,
)
from emberbox.sdk import AsyncSandbox, async_run_code

SERVER_NAME = "emberbox"
MAX_READ_BYTES = 1 << 20  # read_file refuses larger files: they would flood the context
INSTRUCTIONS = (
    "Run untrusted code in isolated microVM sandboxes. run_code without a sandbox_id runs a "
    "program once in a fresh sandbox; for state across calls, create_sandbox, then pass its "
    "id to run_code, run_command and the file tools, and kill_sandbox when done."
)

SandboxId = Annotated[str, Field(description="The id create_sandbox or list_sandboxes gave.")]
GuestPath = Annotated[str, Field(description="An absolute path inside the sandbox.")]
Timeout = Annotated[
    float | None,
    Field(gt=0, description="Seconds before it is killed; null: the server's default."),
]
Encoding = Literal["utf-8", "base64"]
StateName = Literal["creating", "running", "paused", "stopping", "stopped", "error", "lost"]


@dataclass(frozen=True)
class Target:
    """Where the SDK calls go: ``url`` and ``api_key`` as for :class:`AsyncSandbox`
    (None: ``$EMBERBOX_URL`` / ``$EMBERBOX_API_KEY``)."""

    url: str | None = None
    api_key: str | None = field(default=None, repr=False)


TargetResolver = Callable[[Context], Target]


def build_server(resolve: TargetResolver) -> MCPServer:
    """The MCP server with every emberbox tool; ``resolve`` gives each call its target."""
    server: MCPServer = MCPServer(
        SERVER_NAME, instructions=INSTRUCTIONS, version=__version__, log_level="WARNING"
    )
    tools = EmberboxTools(resolve)
    reads = ToolAnnotations(read_only_hint=True)
    server.add_tool(tools.create_sandbox)
    server.add_tool(tools.list_sandboxes, annotations=reads)
    server.add_tool(tools.kill_sandbox, annotations=ToolAnnotations(destructive_hint=True))
    server.add_tool(tools.run_code)
    server.add_tool(tools.run_command)
    server.add_tool(tools.read_file, annotations=reads)
    server.add_tool(tools.write_file, annotations=ToolAnnotations(destructive_hint=True))
    server.add_tool(tools.list_files, annotations=reads)
    return server


@contextmanager
def _tool_errors() -> Iterator[None]:
    """emberbox errors as tool errors the agent reads (the class name tells what to do)."""
    try:
        yield
    except errors.EmberboxError as exc:
        raise ToolError(f"{type(exc).__name__}: {exc}") from exc


class EmberboxTools:
    """The tools, as bound methods (their docstrings are what the agent reads)."""

    def __init__(self, resolve: TargetResolver) -> None:
        self._resolve = resolve

    @asynccontextmanager
    async def _sandbox(self, ctx: Context, sandbox_id: str) -> AsyncIterator[AsyncSandbox]:
        """A handle on the sandbox for this call; its connection is closed after (the
        sandbox keeps running), and emberbox errors become tool errors."""
        target = self._resolve(ctx)
        sandbox = AsyncSandbox(sandbox_id, url=target.url, api_key=target.api_key)
        try:
            with _tool_errors():
                yield sandbox
        finally:
            await sandbox.close()

    async def create_sandbox(
        self,
        ctx: Context,
        image: Annotated[
            str | None, Field(description="Guest image; null: the server's default image.")
        ] = None,
        timeout_s: Annotated[
            int | None,
            Field(ge=1, description="Lifetime in seconds; null: the server's default."),
        ] = None,
    ) -> SandboxSummary:
        """Boot a new microVM sandbox and return once it is ready (under a minute, longer on
        slow hosts). It has no network. Kill it with kill_sandbox when done; the server
        kills it anyway once its lifetime is over."""
        target = self._resolve(ctx)
        with _tool_errors():
            sandbox = await AsyncSandbox.create(
                image, timeout_s=timeout_s, url=target.url, api_key=target.api_key
            )
            try:
                return sandbox_summary(await sandbox.info())
            finally:
                await sandbox.close()

    async def list_sandboxes(
        self,
        ctx: Context,
        state: Annotated[
            StateName | None, Field(description="Only sandboxes in this state; null: all.")
        ] = None,
    ) -> SandboxListing:
        """The sandboxes this API key may see (its tenant's own; an admin key sees all)."""
        target = self._resolve(ctx)
        with _tool_errors():
            found = await AsyncSandbox.list(state=state, url=target.url, api_key=target.api_key)
        return SandboxListing(sandboxes=[sandbox_summary(info) for info in found])

    async def kill_sandbox(self, ctx: Context, sandbox_id: SandboxId) -> SandboxKilled:
        """Stop a sandbox and delete its disk. Killing it twice is fine."""
        async with self._sandbox(ctx, sandbox_id) as sandbox:
            await sandbox.kill()
        return SandboxKilled(id=sandbox_id)

    async def run_code(
        self,
        ctx: Context,
        language: Annotated[Language, Field(description="The program's language.")],
        code: Annotated[str, Field(description="The program's source.")],
        sandbox_id: Annotated[
            str | None,
            Field(description="Run in this sandbox; null: in a fresh one, killed after."),
        ] = None,
        stdin: Annotated[str | None, Field(description="Text fed to its stdin.")] = None,
        timeout_s: Timeout = None,
    ) -> CodeResult:
        """Compile (c, c++) and run a program; returns status (ok, runtime_error,
        compile_error, timeout, memory_limit, output_limit), exit code, stdout, stderr and
        time. Without sandbox_id it runs once in a fresh sandbox (server defaults: 10 s,
        256 MiB); with one, its files stay in /tmp/mcp-run-* of that sandbox."""
        if sandbox_id is None:
            target = self._resolve(ctx)
            with _tool_errors():
                result = await async_run_code(
                    language,
                    code,
                    stdin=stdin,
                    timeout_s=timeout_s,
                    url=target.url,
                    api_key=target.api_key,
                )
            return oneshot_result(result)
        plan = plans.plan(language, secrets.token_hex(4))
        async with self._sandbox(ctx, sandbox_id) as sandbox:
            await sandbox.files.make_dir(plan.work_dir)
            await sandbox.files.write(plan.source_path, code)
            compiled = None
            if plan.compile_argv is not None:
                compiled = await sandbox.commands.run(
                    plan.compile_argv, cwd=plan.work_dir, timeout_s=COMPILE_TIMEOUT_S
                )
                if plans.compile_failed(compiled):
                    return plans.judge(sandbox_id, compiled, None)
            ran = await sandbox.commands.run(
                plan.run_argv, cwd=plan.work_dir, timeout_s=timeout_s, stdin=stdin
            )
        return plans.judge(sandbox_id, compiled, ran)

    async def run_command(
        self,
        ctx: Context,
        sandbox_id: SandboxId,
        command: Annotated[str, Field(description="A shell command line (run by /bin/sh -c).")],
        cwd: Annotated[
            str | None, Field(description="Working directory; null: the sandbox's default.")
        ] = None,
        env: Annotated[
            dict[str, str] | None, Field(description="Environment variables to add.")
        ] = None,
        timeout_s: Timeout = None,
        stdin: Annotated[str | None, Field(description="Text fed to its stdin.")] = None,
    ) -> CommandOutput:
        """Run a shell command in a sandbox and wait for it; returns exit code, stdout,
        stderr and duration. A non-zero exit code is a result, not an error."""
        async with self._sandbox(ctx, sandbox_id) as sandbox:
            result = await sandbox.commands.run(
                command, env=env, cwd=cwd, timeout_s=timeout_s, stdin=stdin
            )
        return command_output(result)

    async def read_file(
        self,
        ctx: Context,
        sandbox_id: SandboxId,
        path: GuestPath,
        encoding: Annotated[
            Encoding, Field(description="utf-8 for text, base64 for binary files.")
        ] = "utf-8",
    ) -> FileContent:
        """Read a file of a sandbox (at most 1 MiB; for larger ones run head or tail)."""
        async with self._sandbox(ctx, sandbox_id) as sandbox:
            info = await sandbox.files.stat(path)
            if info.type == "dir":
                raise ToolError(f"InvalidRequest: {path} is a directory; use list_files")
            if info.size > MAX_READ_BYTES:
                raise ToolError(
                    f"InvalidRequest: {path} has {info.size} bytes, more than read_file "
                    f"returns ({MAX_READ_BYTES}); read parts of it with run_command"
                )
            data = await sandbox.files.read(path)
        if encoding == "base64":
            return FileContent(
                path=path,
                encoding=encoding,
                content=base64.b64encode(data).decode(),
                size=len(data),
            )
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ToolError(
                f"InvalidRequest: {path} is not UTF-8 text; read it with encoding=base64"
            ) from None
        return FileContent(path=path, encoding=encoding, content=text, size=len(data))

    async def write_file(
        self,
        ctx: Context,
        sandbox_id: SandboxId,
        path: GuestPath,
        content: Annotated[str, Field(description="The whole new content.")],
        encoding: Annotated[
            Encoding, Field(description="How content is given: utf-8 text or base64 bytes.")
        ] = "utf-8",
    ) -> FileWritten:
        """Create or replace a file in a sandbox; missing parent directories are made."""
        data = _decode(content, encoding)
        async with self._sandbox(ctx, sandbox_id) as sandbox:
            parent = posixpath.dirname(path.rstrip("/"))
            if parent not in ("", "/"):
                await sandbox.files.make_dir(parent)
            size = await sandbox.files.write(path, data)
        return FileWritten(path=path, size=size)

    async def list_files(
        self,
        ctx: Context,
        sandbox_id: SandboxId,
        path: Annotated[str, Field(description="A directory inside the sandbox.")] = "/",
    ) -> FileListing:
        """The entries of a directory in a sandbox (name, path, type, size), by name."""
        async with self._sandbox(ctx, sandbox_id) as sandbox:
            entries = await sandbox.files.list(path)
        return FileListing(path=path, entries=[file_entry(info) for info in entries])


def _decode(content: str, encoding: Encoding) -> bytes:
    if encoding == "utf-8":
        return content.encode("utf-8")
    try:
        return base64.b64decode(content, validate=True)
    except binascii.Error as exc:
        raise ToolError(f"InvalidRequest: content is not valid base64: {exc}") from None
