"""Python client for an emberbox server, blocking (:class:`Sandbox`) and asyncio
(:class:`AsyncSandbox`), with the same calls and signatures::

    from emberbox.sdk import Sandbox

    with Sandbox.create() as sb:  # $EMBERBOX_URL, default http://127.0.0.1:8080
        print(sb.commands.run("python3 -c 'print(6*7)'").stdout)  # 42

Errors the server raises arrive as the same classes of :mod:`emberbox.errors`
(``NotFound``, ``Conflict``, ``ImageNotFound`` ...); a server that cannot be reached is
a :class:`HostError`.
"""

from __future__ import annotations

from emberbox.errors import (
    AgentError,
    BootTimeout,
    Conflict,
    EmberboxError,
    ExecTimeout,
    HostError,
    ImageNotFound,
    InvalidRequest,
    NotFound,
    QuotaExceeded,
    VMMError,
)
from emberbox.sdk._async import AsyncCommands, AsyncSandbox
from emberbox.sdk._calls import CommandResult, SandboxInfo
from emberbox.sdk._sync import Commands, Sandbox

__all__ = [
    "AgentError",
    "AsyncCommands",
    "AsyncSandbox",
    "BootTimeout",
    "CommandResult",
    "Commands",
    "Conflict",
    "EmberboxError",
    "ExecTimeout",
    "HostError",
    "ImageNotFound",
    "InvalidRequest",
    "NotFound",
    "QuotaExceeded",
    "Sandbox",
    "SandboxInfo",
    "VMMError",
]
