"""Where a VM's start spends its time: named phases, timed with the monotonic clock.

Cheap enough to run on every start (two ``perf_counter`` calls per phase, no I/O). The
driver records its phases (disk overlay, VMM spawn, host cgroup, QMP, state load) on the
VM it returns; the service adds its own (network, agent hello, warm-up exec) and the
bench prints them (docs/benchmarks.md, "Where create -> first exec goes").
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


class Phases:
    """Phase name -> milliseconds, in the order first seen (a repeated name adds up)."""

    def __init__(self) -> None:
        self._ms: dict[str, float] = {}

    def add(self, name: str, ms: float) -> None:
        self._ms[name] = self._ms.get(name, 0.0) + ms

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Time the ``with`` block as ``name`` (also when it raises)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, (time.perf_counter() - started) * 1000)

    def merge(self, other: Phases | None) -> None:
        """Add ``other``'s phases after this one's (None: nothing)."""
        if other is not None:
            for name, ms in other.as_dict().items():
                self.add(name, ms)

    def as_dict(self) -> dict[str, float]:
        return dict(self._ms)

    def total_ms(self) -> float:
        return sum(self._ms.values())


def phases_of(obj: object) -> Phases | None:
    """``obj.phases`` when it is a :class:`Phases` (VMs of a driver that times itself)."""
    found = getattr(obj, "phases", None)
    return found if isinstance(found, Phases) else None
