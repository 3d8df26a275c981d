"""``emberbox mcp``: the emberbox tools for an MCP host (Claude Desktop, Cursor, agent
frameworks) over stdio.

A client verb: it starts no sandbox service of its own, every tool is a call to a
running ``emberbox serve`` at ``--url`` (``$EMBERBOX_URL``) with ``--api-key``
(``$EMBERBOX_API_KEY``), as any SDK client. It needs the ``mcp`` package
(``pip install 'emberbox[mcp]'``), imported only when the verb runs. stdout carries the
protocol; logs go to stderr. docs/mcp.md.
"""

from __future__ import annotations

from emberbox.cli.common import ApiKey, Url, fail


def mcp(url: Url = None, api_key: ApiKey = None) -> None:
    """Serve the emberbox tools to an MCP host over stdio (see docs/mcp.md)."""
    try:
        from emberbox.mcp import Target, build_server
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("mcp"):  # mcp or mcp_types
            raise
        fail(f"emberbox mcp needs the mcp package: pip install 'emberbox[mcp]' ({exc})", 1)
    target = Target(url=url, api_key=api_key)
    build_server(lambda _ctx: target).run("stdio")
