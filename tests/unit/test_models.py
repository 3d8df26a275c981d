"""The wire schemas: defaults, bounds, and the API's views of service objects."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import get_args

import pytest
from pydantic import BaseModel, ValidationError

from emberbox.agent_client.client import ExecResult, FileInfo, ProcessInfo, ProcessStatus
from emberbox.api import views
from emberbox.models import (
    CommandRequest,
    ExecRequest,
    SandboxCreate,
    SandboxStateName,
    TimeoutUpdate,
    VMCreate,
)
from emberbox.service.oneshot.runner import LanguageInfo, RunResult, RunStatus
from emberbox.service.sandboxes.handles import SandboxRecord
from emberbox.service.sandboxes.state import SandboxState
from emberbox.service.snapshots.records import SnapshotRecord


def test_sandbox_create_leaves_defaults_to_the_server() -> None:
    """Unset shape fields are None so that Settings' defaults apply."""
    body = SandboxCreate()
    assert (body.image, body.vcpus, body.memory_mib, body.timeout_s) == (None, None, None, None)
    assert (body.metadata, body.env, body.snapshot_id) == ({}, {}, None)


@pytest.mark.parametrize(
    "fields",
    [
        {"vcpus": 0},
        {"vcpus": 65},
        {"memory_mib": 63},
        {"memory_mib": 10**9},
        {"timeout_s": 0},
        {"image": ""},
        {"image": "a/b"},
        {"env": {"1X": "v"}},
        {"env": {"X": "a\x00b"}},
        {"metadata": {"": "v"}},
        {"metadata": {f"k{i}": "v" for i in range(65)}},
        {"snapshot_id": ""},
        {"snapshot_id": "../x"},
        {"snapshot_id": ".x"},
        {"snapshot_id": "a\x00"},
        {"snapshot_id": "x" * 129},
        {"unknown": 1},
    ],
)
def test_sandbox_create_bounds(fields: dict[str, object]) -> None:
    """Out-of-range, malformed or unknown fields fail validation."""
    with pytest.raises(ValidationError):
        SandboxCreate.model_validate(fields)


def test_request_models_forbid_unknown_fields() -> None:
    """Every request model refuses fields it does not know."""
    cases: list[tuple[type[BaseModel], dict[str, object]]] = [
        (ExecRequest, {"cmd": "ls"}),
        (TimeoutUpdate, {"timeout_s": 5}),
        (VMCreate, {"name": "n", "user_id": "u"}),
        (CommandRequest, {"vm_id": "v", "command": "ls"}),
    ]
    for model, good in cases:
        model.model_validate(good)
        with pytest.raises(ValidationError, match="extra"):
            model.model_validate({**good, "surprise": True})


def test_state_names_match_the_service_enum() -> None:
    """The wire's state names are exactly SandboxState's values."""
    assert set(get_args(SandboxStateName)) == {state.value for state in SandboxState}


def test_exec_request_command_forms() -> None:
    """A string is a shell line, a list an argv; neither may be blank or hold NUL."""
    assert ExecRequest(cmd="echo hi").cmd == "echo hi"
    assert ExecRequest(cmd=["echo", "hi"]).cmd == ["echo", "hi"]
    for bad in ([], "", " ", [""], ["ls", "a\x00"], "a\x00"):
        with pytest.raises(ValidationError):
            ExecRequest(cmd=bad)
    with pytest.raises(ValidationError):
        ExecRequest(cmd="x", timeout_s=float("inf"))


def test_exec_response_decodes_output() -> None:
    """Output bytes become text; invalid UTF-8 is replaced, not an error."""
    result = ExecResult(2, b"ok \xe2\x9c\x93\n", b"\xff", duration_ms=12.5, timed_out=True)
    response = views.exec_response(result)
    assert response.stdout == "ok \u2713\n"
    assert response.stderr == "\ufffd"
    assert (response.exit_code, response.duration_ms, response.timed_out) == (2, 12.5, True)


def test_sandbox_public_hides_host_details() -> None:
    """The public view carries the state's value and drops env, pid and work dir."""
    now = datetime(2026, 1, 1, tzinfo=UTC)
    record = SandboxRecord(
        id="sb-1",
        state=SandboxState.RUNNING,
        image="default",
        vcpus=2,
        memory_mib=256,
        metadata={"a": "b"},
        env={"TOKEN": "secret"},
        timeout_s=60,
        created_at=now,
        expires_at=now,
        ip_address=None,
        vmm_pid=1,
        work_dir=Path("/var/lib/x"),
        error=None,
    )
    public = views.sandbox_public(record)
    assert (public.state, public.snapshot_id) == ("running", None)
    dumped = public.model_dump_json()
    assert "secret" not in dumped
    assert "/var/lib/x" not in dumped


def test_sandbox_public_carries_the_snapshot_it_was_forked_from() -> None:
    """A forked sandbox names its snapshot; a paused one says `paused`."""
    now = datetime(2026, 1, 1, tzinfo=UTC)
    record = SandboxRecord(
        id="sb-2",
        state=SandboxState.PAUSED,
        image="default",
        vcpus=1,
        memory_mib=512,
        metadata={},
        env={},
        timeout_s=60,
        created_at=now,
        expires_at=now,
        ip_address=None,
        vmm_pid=None,
        work_dir=Path("/var/lib/x"),
        error=None,
        snapshot_id="snap-1",
    )
    public = views.sandbox_public(record)
    assert (public.state, public.snapshot_id) == ("paused", "snap-1")


def test_snapshot_public_hides_host_details() -> None:
    """The public view drops the host path and the VMM that wrote the snapshot."""
    record = SnapshotRecord(
        id="snap-1",
        sandbox_id="sb-1",
        image="python",
        vcpus=2,
        memory_mib=256,
        vmm="firecracker",
        vmm_version="1.9.0",
        size_bytes=123,
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        path=Path("/var/lib/emberbox/snapshots/snap-1"),
    )
    public = views.snapshot_public(record)
    assert (public.id, public.sandbox_id, public.size_bytes) == ("snap-1", "sb-1", 123)
    dumped = public.model_dump_json()
    assert "/var/lib" not in dumped
    assert "firecracker" not in dumped


def test_file_entry_keeps_permission_bits_and_known_types() -> None:
    """The file view keeps st_mode's permission bits and maps odd types to `other`."""
    info = FileInfo("x", "/tmp/x", "dir", size=4096, mode=0o40755, mtime=1.5)
    entry = views.file_entry(info)
    assert (entry.type, entry.mode, entry.mtime) == ("dir", 0o755, 1.5)
    fifo = views.file_entry(FileInfo("p", "/p", "other", size=0, mode=0o10644, mtime=0.0))
    assert (fifo.type, fifo.mode) == ("other", 0o644)


def test_process_views_and_their_exit_event() -> None:
    """A process and its status keep their fields; an ended one's exit event omits the pid."""
    info = ProcessInfo(7, "sleep 1", running=True, exit_code=None, pty=True, started_at=2.0)
    assert views.process_public(info).model_dump() == {
        "pid": 7,
        "cmd": "sleep 1",
        "running": True,
        "exit_code": None,
        "pty": True,
        "started_at": 2.0,
    }
    status = ProcessStatus(7, False, 137, 9, 12.0, True, False, True)
    event = views.process_status_public(status).exit_event()
    assert (event.exit_code, event.signal, event.timed_out, event.memory_limited) == (
        137,
        9,
        True,
        True,
    )


def test_exec_exit_event_and_command_response() -> None:
    """A streamed exec's last event and the seed's answer come from the same result."""
    result = ExecResult(1, b"out\n", b"err\xff", duration_ms=float("nan"), memory_limited=True)
    event = views.exec_exit_event(result)
    assert (event.exit_code, event.duration_ms, event.memory_limited) == (1, 0.0, True)
    response = views.command_response(result)
    assert (response.success, response.output) == (False, "out\nerr\ufffd")


def test_run_and_language_views() -> None:
    """A run's output is decoded and a non-finite time is null; languages keep their fields."""
    inf = float("inf")
    result = RunResult(RunStatus.TIMEOUT, stdout=b"\xff", compile_output=b"ok", time_ms=inf)
    response = views.run_response(result)
    assert (response.status, response.stdout, response.time_ms) == ("timeout", "\ufffd", None)
    assert response.compile_output == "ok"
    language = views.language_public(LanguageInfo("c", "gcc 12", "main.c", compiled=True))
    assert (language.name, language.version, language.compiled) == ("c", "gcc 12", True)


def test_image_public_marks_the_default_and_reads_the_kernel_release() -> None:
    """The image view says which image is the default and finds the kernel's release."""
    created = datetime(2026, 1, 1, tzinfo=UTC)
    info = SimpleNamespace(
        name="default", size_bytes=1, created_at=created, manifest={"kernel": {"release": "6.1"}}
    )
    public = views.image_public(info, default_name="default")  # type: ignore[arg-type]
    assert (public.default, public.kernel_release) == (True, "6.1")
    odd = SimpleNamespace(name="x", size_bytes=1, created_at=created, manifest={"kernel": 3})
    public = views.image_public(odd, default_name="default")  # type: ignore[arg-type]
    assert (public.default, public.kernel_release) == (False, None)
