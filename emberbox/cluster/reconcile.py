"""What to change when a host is seen again (pure): the index against the host's list.

For one host, ``index`` is the API replicas' rows of its sandboxes and ``remote`` what
the host's own server lists. The plan:

- an index row ``lost`` that the host runs (or holds paused) -> that state again;
- an index row ``running``/``paused`` that the host reports in another settled state
  (TTL expiry: ``stopped``; paused or resumed by the host) -> the host's state;
- an index row ``running``/``paused`` that the host does not know -> ``lost``;
- a sandbox live on the host that the index does not have, or has ended (``stopped``,
  ``error``) -> killed on the host (an orphan), unless it is younger than the grace
  period (a create whose index row is being written right now);
- rows in ``creating``/``stopping`` belong to an API call in flight: left alone;
- a ``lost`` row the host does not know stays ``lost``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

LIVE_ON_HOST = frozenset({"creating", "running", "paused", "stopping"})
SETTLED = frozenset({"running", "paused", "stopped", "error"})
SYNCED = frozenset({"running", "paused"})  # index states the host's word overrides
ENDED = frozenset({"stopped", "error"})
LOST = "lost"
ORPHAN_GRACE_S = 300.0  # a create's boot under TCG can take minutes


@dataclass(frozen=True)
class RemoteSandbox:
    """One sandbox as the host's server lists it."""

    id: str
    state: str
    created_at: datetime


@dataclass(frozen=True)
class Move:
    sandbox_id: str
    from_state: str
    to_state: str


@dataclass(frozen=True)
class Plan:
    moves: list[Move] = field(default_factory=list)
    kill: list[str] = field(default_factory=list)  # sandbox ids to kill on the host


def plan(
    index: Mapping[str, str],
    remote: Iterable[RemoteSandbox],
    *,
    now: datetime,
    grace_s: float = ORPHAN_GRACE_S,
) -> Plan:
    """``index``: sandbox id -> state in the index, for this host's rows."""
    on_host = {sandbox.id: sandbox for sandbox in remote}
    result = Plan()
    for sandbox_id, state in sorted(index.items()):
        found = on_host.get(sandbox_id)
        if found is None:
            if state in SYNCED:
                result.moves.append(Move(sandbox_id, state, LOST))
        elif (state == LOST and found.state in SYNCED) or (
            state in SYNCED and found.state in SETTLED and found.state != state
        ):
            result.moves.append(Move(sandbox_id, state, found.state))
        elif state in ENDED and found.state in LIVE_ON_HOST:
            result.kill.append(sandbox_id)
    young = now - timedelta(seconds=grace_s)
    for sandbox in on_host.values():
        if sandbox.id in index or sandbox.state not in LIVE_ON_HOST:
            continue
        if sandbox.state != "creating" and sandbox.created_at < young:
            result.kill.append(sandbox.id)
    result.kill.sort()
    return result
