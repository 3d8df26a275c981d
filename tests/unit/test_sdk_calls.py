"""The SDK's requests and responses without a server: each call's method, path, body and
wait, and the errors an answer maps back to."""

from __future__ import annotations

import httpx
import pytest

from emberbox import errors
from emberbox.sdk import _calls


def test_calls_are_sized_to_their_work() -> None:
    """Exec waits for its own timeout plus a margin; create waits for a slow boot."""
    create = _calls.create_call("img", None, 256, None, {"a": "b"}, None)
    assert create.json == {"image": "img", "memory_mib": 256, "metadata": {"a": "b"}}
    assert create.wait_s >= 120
    run = _calls.run_call("sb-1", "sleep 100", None, None, 100, None)
    assert run.json == {"cmd": "sleep 100", "timeout_s": 100}
    assert run.wait_s == 100 + _calls.EXEC_MARGIN_S
    assert _calls.run_call("sb-1", ["ls"], None, None, None, None).wait_s >= 3600
    listing = _calls.list_call("running", {"team": "a"})
    assert listing.params == [("state", "running"), ("metadata.team", "a")]
    with pytest.raises(errors.InvalidRequest):
        _calls.get_call("../healthz")


def test_snapshot_calls() -> None:
    """Snapshot, pause and resume wait for a memory dump; ids cannot change the path."""
    fork = _calls.create_call(None, None, None, None, None, None, "snap-1")
    assert fork.json == {"snapshot_id": "snap-1"}
    for call, method, path in [
        (_calls.snapshot_call("sb-1"), "POST", "/v1/sandboxes/sb-1/snapshots"),
        (_calls.pause_call("sb-1"), "POST", "/v1/sandboxes/sb-1/pause"),
        (_calls.resume_call("sb-1"), "POST", "/v1/sandboxes/sb-1/resume"),
    ]:
        assert (call.method, call.path, call.json) == (method, path, None)
        assert call.wait_s > 300
    assert _calls.list_snapshots_call(None).params == []
    assert _calls.list_snapshots_call("sb-1").params == [("sandbox_id", "sb-1")]
    assert _calls.get_snapshot_call("snap-1").path == "/v1/snapshots/snap-1"
    assert _calls.delete_snapshot_call("snap-1").method == "DELETE"
    with pytest.raises(errors.InvalidRequest, match="not a snapshot id"):
        _calls.delete_snapshot_call("../v1/sandboxes/sb-1")


def _response(status: int, body: object | None = None, text: str = "") -> httpx.Response:
    request = httpx.Request("GET", "http://e/v1/sandboxes")
    if body is None:
        return httpx.Response(status, text=text, request=request)
    return httpx.Response(status, json=body, request=request)


def test_error_mapping_of_unknown_and_malformed_bodies() -> None:
    """Unknown types give EmberboxError, ValidationError InvalidRequest, HTML a status line."""
    unknown = _calls.error_from_response(
        _response(418, {"error": {"type": "Teapot", "message": "m"}})
    )
    assert type(unknown) is errors.EmberboxError
    assert str(unknown) == "m"
    invalid = _calls.error_from_response(
        _response(422, {"error": {"type": "ValidationError", "message": "vcpus: bad"}})
    )
    assert type(invalid) is errors.InvalidRequest
    timeout = _calls.error_from_response(
        _response(504, {"error": {"type": "ExecTimeout", "message": "t"}})
    )
    assert isinstance(timeout, errors.ExecTimeout)
    assert timeout.result is None
    corrupt = _calls.error_from_response(
        _response(502, {"error": {"type": "SnapshotCorrupt", "message": "m", "console_tail": "t"}})
    )
    assert isinstance(corrupt, errors.VMMError)
    assert (type(corrupt), corrupt.console_tail) == (errors.SnapshotCorrupt, "t")
    html = _calls.error_from_response(_response(502, text="<html>Bad Gateway</html>"))
    assert type(html) is errors.EmberboxError
    assert "HTTP 502" in str(html)
    assert "Bad Gateway" in str(html)


def test_every_error_class_survives_the_round_trip() -> None:
    """Each class of the tree, sent by name, comes back as exactly that class."""
    classes = errors.all_error_classes()
    assert classes["SnapshotMismatch"] is errors.SnapshotMismatch
    assert classes["SnapshotCorrupt"] is errors.SnapshotCorrupt
    for name, cls in classes.items():
        body = {"error": {"type": name, "message": "boom"}}
        exc = _calls.error_from_response(_response(cls.status_code, body))
        assert type(exc) is cls
        assert exc.message == "boom"
