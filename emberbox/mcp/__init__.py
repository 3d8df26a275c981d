"""emberbox as an MCP server (the official ``mcp`` SDK): tools to create sandboxes, run
code and commands, move files, and list and kill sandboxes, for AI agents and their hosts.

``emberbox mcp`` serves them over stdio (:mod:`emberbox.cli.mcp`); the API server mounts
them at ``/mcp`` over streamable HTTP (:mod:`emberbox.api.mcp`). Either way each tool is
an SDK call to an emberbox server, under the caller's API key (docs/mcp.md).
"""

from __future__ import annotations

from emberbox.mcp.tools import Target, TargetResolver, build_server

__all__ = ["Target", "TargetResolver", "build_server"]
