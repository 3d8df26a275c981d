"""Stand-ins at the VMM layer: :class:`LiveProcess`, a VMM process that never ends (and
ignores kill), for the Firecracker API client's timeouts."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from emberbox.vmm.firecracker.process import VMMProcess


class LiveProcess:
    """A VMM process that is always running: no exit status, and kill does nothing."""

    pid = 4_000_000

    def poll(self) -> int | None:
        return None

    def kill(self) -> None:
        pass


if TYPE_CHECKING:
    _process: VMMProcess = LiveProcess()
