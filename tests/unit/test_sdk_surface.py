"""The SDK's public surface: the sync and async clients' parity, the flat __all__, and no
server code loaded by importing it."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pytest

import emberbox.sdk as sdk
from emberbox import errors
from emberbox.sdk import AsyncSandbox, AsyncSnapshots, Sandbox, Snapshots


def _public_methods(cls: type) -> dict[str, list[tuple[object, ...]]]:
    """Each public method's parameters as (name, kind, default, annotation without Async)."""
    return {
        name: [
            (p.name, p.kind, p.default, str(p.annotation).replace("Async", ""))
            for p in inspect.signature(member).parameters.values()
        ]
        for name, member in inspect.getmembers(cls)
        if callable(member) and (not name.startswith("_") or name == "__init__")
    }


@pytest.mark.parametrize(
    ("sync_cls", "async_cls"),
    [
        (Sandbox, AsyncSandbox),
        (sdk.Commands, sdk.AsyncCommands),
        (Snapshots, AsyncSnapshots),
        (sdk.CommandHandle, sdk.AsyncCommandHandle),
        (sdk.Files, sdk.AsyncFiles),
        (sdk.Pty, sdk.AsyncPty),
        (sdk.Ports, sdk.AsyncPorts),
        (sdk.PtySession, sdk.AsyncPtySession),
        (sdk.Cluster, sdk.AsyncCluster),
    ],
)
def test_sync_and_async_have_the_same_calls(sync_cls: type, async_cls: type) -> None:
    """Same public names and parameters (names, kinds, defaults) in both clients."""
    sync_methods, async_methods = _public_methods(sync_cls), _public_methods(async_cls)
    assert set(sync_methods) == set(async_methods)
    for name, signature in sync_methods.items():
        assert signature == async_methods[name], name
        if name != "__init__":
            assert inspect.iscoroutinefunction(getattr(async_cls, name)), name
    assert set(_public_methods(Sandbox)) >= {
        "create",
        "connect",
        "list",
        "info",
        "get_info",
        "kill",
        "set_timeout",
        "pause",
        "resume",
        "snapshot",
    }


def test_exported_members() -> None:
    """The SDK's public surface is its flat __all__, error classes included."""
    assert set(sdk.__all__) == {name for name in dir(sdk) if not name.startswith("_")} - {
        "annotations"
    }
    for name in (
        "Sandbox",
        "AsyncSandbox",
        "CommandResult",
        "SandboxInfo",
        "NotFound",
        "HostError",
        "Snapshots",
        "AsyncSnapshots",
        "SnapshotInfo",
        "SnapshotMismatch",
        "SnapshotCorrupt",
        "CommandHandle",
        "AsyncCommandHandle",
        "Files",
        "AsyncFiles",
        "PtySession",
        "AsyncPtySession",
        "FileInfo",
        "ProcessInfo",
        "ProcessStatus",
    ):
        assert name in sdk.__all__
    assert sdk.NotFound is errors.NotFound


SERVER_MODULES = (
    *("emberbox.service", "emberbox.api", "emberbox.agent_client", "emberbox.images"),
    *("emberbox.store", "emberbox.vmm", "emberbox.net", "emberbox.config", "emberbox.guest"),
    *("fastapi", "starlette", "uvicorn", "pydantic_settings", "lz4"),
)


def test_the_sdk_loads_no_server_code() -> None:
    """`import emberbox.sdk` (wire models included) loads no server module or dependency."""
    code = (
        "import json, sys, emberbox, emberbox.sdk, emberbox.models.oneshot; "
        "emberbox.run_code; print(json.dumps(sorted(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(done.stdout)
    assert "emberbox.models.sandboxes" in loaded
    assert [name for name in loaded if name.startswith(SERVER_MODULES)] == []
