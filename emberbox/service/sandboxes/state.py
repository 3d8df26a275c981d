"""The lifecycle of a sandbox: its states and the only moves allowed between them.

::

    creating ──► running | error | stopping
    running  ──► paused | stopping | error
    paused   ──► running | stopping | error    (saved to disk; no VMM while paused)
    stopping ──► stopped | error
    error    ──► stopping | stopped      (cleanup of a failed sandbox)
    stopped      final
    lost     ──► running | paused | stopped   (cluster only, see below)

``lost`` is the cluster's (docs/cluster.md): the API replica's index marks a sandbox
lost when its host stops answering (from creating, running, paused or stopping), and
back to running or paused when the host returns with it, or stopped when it returns
without it or the sandbox is killed meanwhile. A single-host server never produces it.

The state is stored in SQLite (``sandboxes.state``); every change goes through
:func:`check_transition` and a compare-and-set in the store, so two tasks can never both
move one sandbox out of the same state.
"""

from __future__ import annotations

import enum

from emberbox import errors


class SandboxState(enum.StrEnum):
    """Where a sandbox is in its life. The value is what SQLite and the API carry."""

    CREATING = "creating"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"
    ERROR = "error"
    LOST = "lost"  # cluster mode only: its host does not answer


_ALLOWED: dict[SandboxState, frozenset[SandboxState]] = {
    SandboxState.CREATING: frozenset(
        {SandboxState.RUNNING, SandboxState.ERROR, SandboxState.STOPPING, SandboxState.LOST}
    ),
    SandboxState.RUNNING: frozenset(
        {SandboxState.PAUSED, SandboxState.STOPPING, SandboxState.ERROR, SandboxState.LOST}
    ),
    SandboxState.PAUSED: frozenset(
        {SandboxState.RUNNING, SandboxState.STOPPING, SandboxState.ERROR, SandboxState.LOST}
    ),
    SandboxState.STOPPING: frozenset({SandboxState.STOPPED, SandboxState.ERROR, SandboxState.LOST}),
    SandboxState.ERROR: frozenset({SandboxState.STOPPING, SandboxState.STOPPED}),
    SandboxState.STOPPED: frozenset(),
    SandboxState.LOST: frozenset({SandboxState.RUNNING, SandboxState.PAUSED, SandboxState.STOPPED}),
}

#: States in which a sandbox holds (or may soon hold) a VMM; they count against the cap.
LIVE_STATES: frozenset[SandboxState] = frozenset({SandboxState.CREATING, SandboxState.RUNNING})

#: States the reconciler must look at after a server restart.
UNSETTLED_STATES: frozenset[SandboxState] = frozenset(
    {SandboxState.CREATING, SandboxState.RUNNING, SandboxState.STOPPING}
)


def can_transition(src: SandboxState, dst: SandboxState) -> bool:
    """True when ``src → dst`` is an allowed move."""
    return dst in _ALLOWED[src]


def sources(dst: SandboxState) -> frozenset[SandboxState]:
    """Every state from which ``dst`` may be reached (the compare-and-set's ``from``)."""
    return frozenset(src for src, targets in _ALLOWED.items() if dst in targets)


def check_transition(src: SandboxState, dst: SandboxState, *, sandbox_id: str) -> None:
    """Raise :class:`errors.Conflict` unless ``src → dst`` is allowed.

    The wording ("sandbox X is stopped; cannot move to running") is the same one the
    store uses when a compare-and-set loses a race.
    """
    if not can_transition(src, dst):
        raise errors.Conflict(
            f"sandbox {sandbox_id} is {src.value}; cannot move to {dst.value}",
            sandbox_id=sandbox_id,
            state=src.value,
            target=dst.value,
        )
