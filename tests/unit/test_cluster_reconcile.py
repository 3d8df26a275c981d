"""The reconcile plan (emberbox/cluster/reconcile.py): index rows against a host's list."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from emberbox.cluster.reconcile import ORPHAN_GRACE_S, Move, RemoteSandbox, plan

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
OLD = NOW - timedelta(seconds=ORPHAN_GRACE_S + 1)


def remote(sandbox_id: str, state: str, created_at: datetime = OLD) -> RemoteSandbox:
    return RemoteSandbox(sandbox_id, state, created_at)


def test_lost_sandboxes_the_host_still_runs_come_back() -> None:
    """lost + host running/paused -> that state; lost + host stopped stays lost."""
    index = {"a": "lost", "b": "lost", "c": "lost"}
    host = [remote("a", "running"), remote("b", "paused"), remote("c", "stopped")]
    result = plan(index, host, now=NOW)
    assert result.moves == [Move("a", "lost", "running"), Move("b", "lost", "paused")]
    assert result.kill == []


def test_lost_rows_the_host_does_not_know_stay_lost() -> None:
    """A lost row the host has no record of: nothing to do."""
    assert plan({"a": "lost"}, [], now=NOW).moves == []


def test_host_made_changes_reach_the_index() -> None:
    """The host stopped a sandbox (TTL) or paused it: the index follows."""
    index = {"a": "running", "b": "running", "c": "paused", "d": "running"}
    host = [
        remote("a", "stopped"),
        remote("b", "error"),
        remote("c", "running"),
        remote("d", "running"),
    ]
    assert plan(index, host, now=NOW).moves == [
        Move("a", "running", "stopped"),
        Move("b", "running", "error"),
        Move("c", "paused", "running"),
    ]


def test_live_rows_unknown_to_the_host_are_lost() -> None:
    """The index says running but the host has no such sandbox: lost."""
    assert plan({"a": "running", "b": "paused"}, [], now=NOW).moves == [
        Move("a", "running", "lost"),
        Move("b", "paused", "lost"),
    ]


def test_calls_in_flight_are_left_alone() -> None:
    """creating/stopping rows belong to an API call in flight: no move, no kill."""
    index = {"a": "creating", "b": "stopping"}
    host = [remote("a", "running"), remote("b", "running")]
    result = plan(index, host, now=NOW)
    assert result.moves == [] and result.kill == []


def test_orphans_are_killed() -> None:
    """Live on the host but absent from the index, or ended in it: killed on the host."""
    index = {"gone": "stopped", "failed": "error"}
    host = [
        remote("gone", "running"),
        remote("failed", "paused"),
        remote("stray", "running"),
        remote("stray-paused", "paused"),
    ]
    assert plan(index, host, now=NOW).kill == ["failed", "gone", "stray", "stray-paused"]


def test_young_and_ended_host_sandboxes_are_not_orphans() -> None:
    """A create whose index row is not written yet, or an ended one, is not killed."""
    host = [
        remote("new", "running", NOW - timedelta(seconds=5)),
        remote("booting", "creating"),
        remote("ended", "stopped"),
    ]
    assert plan({}, host, now=NOW).kill == []
