"""Python client for an emberbox server, blocking (:class:`Sandbox`) and asyncio
(:class:`AsyncSandbox`), with the same calls and signatures::

    from emberbox.sdk import Sandbox

    with Sandbox.create() as sb:  # $EMBERBOX_URL, default http://127.0.0.1:8080
        print(sb.commands.run("python3 -c 'print(6*7)'").stdout)  # 42

Errors the server raises arrive as the same classes of :mod:`emberbox.errors`
(``NotFound``, ``Conflict``, ``ImageNotFound`` ...); a server that cannot be reached is
a :class:`HostError`.

Snapshots: ``sb.snapshot()`` saves a running sandbox, ``Sandbox.create(snapshot_id=...)``
forks new ones from it, :class:`Snapshots` lists and deletes them; ``sb.pause()`` and
``sb.resume()`` park a sandbox on disk and bring it back.
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
    SnapshotCorrupt,
    SnapshotMismatch,
    VMMError,
)
from emberbox.sdk._async import AsyncCommands, AsyncSandbox, AsyncSnapshots
from emberbox.sdk._calls import CommandResult, SandboxInfo, SnapshotInfo
from emberbox.sdk._sync import Commands, Sandbox, Snapshots

__all__ = [
    "AgentError",
    "AsyncCommands",
    "AsyncSandbox",
    "AsyncSnapshots",
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
    "SnapshotCorrupt",
    "SnapshotInfo",
    "SnapshotMismatch",
    "Snapshots",
    "VMMError",
]
