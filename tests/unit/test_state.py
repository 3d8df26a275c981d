"""The sandbox state machine."""

from __future__ import annotations

import itertools

import pytest

from emberbox import errors
from emberbox.service.sandboxes.state import (
    LIVE_STATES,
    SandboxState,
    can_transition,
    check_transition,
    sources,
)

S = SandboxState
ALLOWED = {
    (S.CREATING, S.RUNNING),
    (S.CREATING, S.ERROR),
    (S.CREATING, S.STOPPING),
    (S.RUNNING, S.STOPPING),
    (S.RUNNING, S.ERROR),
    (S.RUNNING, S.PAUSED),
    (S.PAUSED, S.RUNNING),
    (S.PAUSED, S.STOPPING),
    (S.PAUSED, S.ERROR),
    (S.STOPPING, S.STOPPED),
    (S.STOPPING, S.ERROR),
    (S.ERROR, S.STOPPING),
    (S.ERROR, S.STOPPED),
    # cluster mode: a host that stops answering, and comes back (or not)
    (S.CREATING, S.LOST),
    (S.RUNNING, S.LOST),
    (S.PAUSED, S.LOST),
    (S.STOPPING, S.LOST),
    (S.LOST, S.RUNNING),
    (S.LOST, S.PAUSED),
    (S.LOST, S.STOPPED),
}


@pytest.mark.parametrize(("src", "dst"), sorted(itertools.product(S, S)))
def test_exactly_the_documented_moves_are_allowed(src: SandboxState, dst: SandboxState) -> None:
    """Every pair of states is allowed iff it is one of the documented moves."""
    assert can_transition(src, dst) == ((src, dst) in ALLOWED)


def test_illegal_move_raises_conflict_with_exact_message() -> None:
    """An illegal move raises Conflict worded 'sandbox X is stopped; cannot move to running'."""
    with pytest.raises(errors.Conflict) as caught:
        check_transition(S.STOPPED, S.RUNNING, sandbox_id="abc")
    assert str(caught.value) == "sandbox abc is stopped; cannot move to running"
    assert caught.value.details == {"sandbox_id": "abc", "state": "stopped", "target": "running"}


def test_legal_move_passes() -> None:
    """A legal move returns quietly."""
    check_transition(S.CREATING, S.RUNNING, sandbox_id="abc")


def test_stopped_is_final() -> None:
    """Nothing leaves stopped."""
    assert not any(can_transition(S.STOPPED, dst) for dst in S)


def test_sources_inverts_the_table() -> None:
    """sources(dst) lists exactly the states that may move to dst."""
    assert sources(S.STOPPED) == {S.STOPPING, S.ERROR, S.LOST}
    assert sources(S.CREATING) == frozenset()


def test_values_are_the_wire_names() -> None:
    """States are strings equal to their wire names, and only creating/running are live."""
    assert [s.value for s in S] == [
        "creating",
        "running",
        "paused",
        "stopping",
        "stopped",
        "error",
        "lost",
    ]
    assert str(S.RUNNING) == "running"
    assert {S.CREATING, S.RUNNING} == LIVE_STATES
