"""The wire schemas: defaults, bounds, and the conversions from service objects."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import get_args

import pytest
from pydantic import BaseModel, ValidationError

from emberbox.agent_client.client import ExecResult
from emberbox.models import (
    CommandRequest,
    ExecRequest,
    ExecResponse,
    SandboxCreate,
    SandboxPublic,
    SandboxStateName,
    SnapshotPublic,
    TimeoutUpdate,
    VMCreate,
)
from emberbox.service.sandboxes.state import SandboxState
from emberbox.service.snapshots.records import SnapshotRecord
from tests.unit.test_api_fakes import FakeRecord


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
    response = ExecResponse.from_result(result)
    assert response.stdout == "ok \u2713\n"
    assert response.stderr == "\ufffd"
    assert (response.exit_code, response.duration_ms, response.timed_out) == (2, 12.5, True)


def test_sandbox_public_from_record_hides_host_details() -> None:
    """The public view carries the state's value and drops env, pid and work dir."""
    now = datetime(2026, 1, 1, tzinfo=UTC)
    record = FakeRecord(
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
        work_dir="/var/lib/x",
        error=None,
    )
    public = SandboxPublic.from_record(record)  # type: ignore[arg-type]
    assert (public.state, public.snapshot_id) == ("running", None)
    dumped = public.model_dump_json()
    assert "secret" not in dumped
    assert "/var/lib/x" not in dumped


def test_sandbox_public_carries_the_snapshot_it_was_forked_from() -> None:
    """A forked sandbox names its snapshot; a paused one says `paused`."""
    now = datetime(2026, 1, 1, tzinfo=UTC)
    record = FakeRecord(
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
        work_dir="/var/lib/x",
        error=None,
        snapshot_id="snap-1",
    )
    public = SandboxPublic.from_record(record)  # type: ignore[arg-type]
    assert (public.state, public.snapshot_id) == ("paused", "snap-1")


def test_snapshot_public_from_record_hides_host_details() -> None:
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
    public = SnapshotPublic.from_record(record)
    assert (public.id, public.sandbox_id, public.size_bytes) == ("snap-1", "sb-1", 123)
    dumped = public.model_dump_json()
    assert "/var/lib" not in dumped
    assert "firecracker" not in dumped
