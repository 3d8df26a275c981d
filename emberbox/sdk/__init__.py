"""Python client for an emberbox server, blocking (:class:`Sandbox`) and asyncio
(:class:`AsyncSandbox`), with the same calls and signatures. ``pip install emberbox`` is
enough: the client needs none of the server's code or dependencies::

    from emberbox.sdk import Sandbox

    with Sandbox.create() as sb:  # $EMBERBOX_URL, default http://127.0.0.1:8080
        print(sb.commands.run("python3 -c 'print(6*7)'").stdout)  # 42

Errors the server raises arrive as the same classes of :mod:`emberbox.errors`
(``NotFound``, ``Conflict``, ``ImageNotFound`` ...); a server that cannot be reached is
a :class:`HostError`.

Snapshots: ``sb.snapshot()`` saves a running sandbox, ``Sandbox.create(snapshot_id=...)``
forks new ones from it, :class:`Snapshots` lists and deletes them; ``sb.pause()`` and
``sb.resume()`` park a sandbox on disk and bring it back.

Background commands, files and terminals: ``sb.commands.run(cmd, background=True)``
returns a :class:`CommandHandle` (``wait``, ``kill``, ``send_stdin``), and ``on_stdout=``
streams output as it comes; ``sb.files`` reads, writes, lists and copies files and
directories (streamed); ``sb.pty.create(cols, rows)`` opens a :class:`PtySession`;
``sb.ports.url(port)`` (or ``sb.get_host(port)``) reaches a server in the sandbox and
``sb.ports.publish(port)`` gives it a public URL.

Images: ``Images.build("./ctx", name="grader", on_event=print)`` builds one from a
Dockerfile on the server (in microVMs, cached step by step), ``Images.import_(ref,
name=...)`` imports an OCI image, ``Images.list()`` / ``Images.delete(name)``;
``AsyncImages`` for asyncio. ``Sandbox.create(image="grader")`` then starts one.

Clusters (``emberbox serve --cluster``, admin keys): ``Cluster.hosts()`` lists the hosts,
``Cluster.drain(name)`` stops new sandboxes landing on one (``AsyncCluster`` for asyncio).
A create when every host is full raises :class:`NoCapacity` (``retry_after_s``); a call
to a sandbox whose host does not answer raises :class:`HostDown`.

One-shot runs: ``run_code("python3", "print(6*7)")`` compiles and runs a program once in
a fresh sandbox (``async_run_code`` for asyncio; ``list_languages`` for what it takes).
"""

from __future__ import annotations

from emberbox.errors import (
    AgentError,
    BootTimeout,
    Conflict,
    EmberboxError,
    ExecTimeout,
    HostDown,
    HostError,
    ImageBuildError,
    ImageNotFound,
    InvalidRequest,
    NoCapacity,
    NotFound,
    QuotaExceeded,
    RateLimited,
    SnapshotCorrupt,
    SnapshotMismatch,
    StorageFull,
    Unauthorized,
    VMMError,
)
from emberbox.models.images import BuildEvent
from emberbox.sdk._async import AsyncCommands, AsyncSandbox, AsyncSnapshots
from emberbox.sdk._async_guest import AsyncCommandHandle, AsyncFiles, AsyncPty, AsyncPtySession
from emberbox.sdk._async_images import AsyncImages
from emberbox.sdk._calls import CommandResult, SandboxInfo, SnapshotInfo
from emberbox.sdk._cluster import AsyncCluster, Cluster, HostInfo
from emberbox.sdk._guest import FileInfo, ProcessInfo, ProcessStatus
from emberbox.sdk._image_calls import ImageInfo
from emberbox.sdk._images import Images
from emberbox.sdk._oneshot import (
    LanguageInfo,
    RunResult,
    async_list_languages,
    async_run_code,
    list_languages,
    run_code,
)
from emberbox.sdk._ports import AsyncPorts, PortInfo, Ports
from emberbox.sdk._sync import Commands, Sandbox, Snapshots
from emberbox.sdk._sync_guest import CommandHandle, Files, Pty, PtySession

__all__ = [
    "AgentError",
    "AsyncCluster",
    "AsyncCommandHandle",
    "AsyncCommands",
    "AsyncFiles",
    "AsyncImages",
    "AsyncPorts",
    "AsyncPty",
    "AsyncPtySession",
    "AsyncSandbox",
    "AsyncSnapshots",
    "BootTimeout",
    "BuildEvent",
    "Cluster",
    "CommandHandle",
    "CommandResult",
    "Commands",
    "Conflict",
    "EmberboxError",
    "ExecTimeout",
    "FileInfo",
    "Files",
    "HostDown",
    "HostError",
    "HostInfo",
    "ImageBuildError",
    "ImageInfo",
    "ImageNotFound",
    "Images",
    "InvalidRequest",
    "LanguageInfo",
    "NoCapacity",
    "NotFound",
    "PortInfo",
    "Ports",
    "ProcessInfo",
    "ProcessStatus",
    "Pty",
    "PtySession",
    "QuotaExceeded",
    "RateLimited",
    "RunResult",
    "Sandbox",
    "SandboxInfo",
    "SnapshotCorrupt",
    "SnapshotInfo",
    "SnapshotMismatch",
    "Snapshots",
    "StorageFull",
    "Unauthorized",
    "VMMError",
    "async_list_languages",
    "async_run_code",
    "list_languages",
    "run_code",
]
