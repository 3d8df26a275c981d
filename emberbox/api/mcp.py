"""The MCP tools (:mod:`emberbox.mcp`) over streamable HTTP at ``/mcp``, behind the API's
own keys.

The endpoint authenticates the request as every route does (:func:`auth.authenticate`:
401 or 429 with the API's error body) before the MCP SDK sees it, then tells the tools
where their SDK calls go: this same server, over loopback at the address the request
came in on, with the key the request presented. So a tool call is an ordinary API
request of its caller's: the caller's tenant's sandboxes only, its quotas and rate
limit, in the audit log under its key.

Why loopback rather than in-process (httpx's ASGI transport): the SDK opens its own
HTTP clients and takes no transport, and an in-process transport would buffer whole
answers and ignore the SDK's timeouts. The cost is one local connection per call.

Stateless MCP: every POST is an exchange of its own, so there is no session that could
outlive its key's revocation or be borrowed by another key. The session manager runs
inside the app's lifespan (:meth:`McpEndpoint.running`); ``app.py`` adds
:meth:`McpEndpoint.route` to the app.
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from starlette.requests import HTTPConnection
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from emberbox import errors
from emberbox.api.auth import authenticate, presented_key
from emberbox.config import Settings
from emberbox.mcp import Target, build_server

MCP_PATH = "/mcp"
TARGET_SCOPE_KEY = "emberbox.mcp.target"  # set on the ASGI scope by McpEndpoint
_ANY_ADDRESS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104


class McpEndpoint:
    """The ASGI app at ``/mcp``: authenticate, then hand the request to the MCP SDK."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.server: MCPServer = build_server(request_target)
        self._manager: StreamableHTTPSessionManager | None = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The MCP session manager, for the app's lifespan (a fresh one each time: the
        SDK's manager runs only once)."""
        # streamable_http_app() makes the manager; its Starlette app is not used, the
        # request reaches the manager through __call__ below.
        self.server.streamable_http_app(stateless_http=True, host=self._settings.host)
        manager = self.server.session_manager
        async with manager.run():
            self._manager = manager
            try:
                yield
            finally:
                self._manager = None

    def route(self) -> Route:
        """The route to add to the app (the SDK answers each method as the spec says)."""
        methods = ["GET", "POST", "DELETE"]
        return Route(MCP_PATH, self, methods=methods, include_in_schema=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        connection = HTTPConnection(scope)
        await authenticate(connection)  # raises Unauthorized / RateLimited: the usual body
        if self._manager is None:
            raise errors.HostError("the MCP endpoint runs only inside the app's lifespan")
        key = presented_key(connection.headers)
        scope[TARGET_SCOPE_KEY] = Target(url=loopback_url(scope, self._settings), api_key=key)
        await self._manager.handle_request(scope, receive, send)


def request_target(ctx: Context) -> Target:
    """The target :class:`McpEndpoint` put on the request that carried this tool call."""
    request = ctx.request_context.request
    scope = getattr(request, "scope", None)
    target = scope.get(TARGET_SCOPE_KEY) if isinstance(scope, dict) else None
    if not isinstance(target, Target):  # never reached through McpEndpoint
        raise ToolError("Unauthorized: this MCP request was not authenticated")
    return target


def loopback_url(scope: Scope, settings: Settings) -> str:
    """This server's own URL as seen from this host: the local address the request came
    in on (the ASGI ``server``), else the configured host and port. Plain HTTP, as
    ``emberbox serve`` speaks (a TLS proxy in front of it is bypassed)."""
    server = scope.get("server")
    if isinstance(server, tuple | list) and len(server) == 2 and server[1] is not None:
        host, port = str(server[0]), int(server[1])
    else:
        host, port = settings.host, settings.port
    host = _ANY_ADDRESS.get(host, host)
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:  # a name
        pass
    return f"http://{host}:{port}"
