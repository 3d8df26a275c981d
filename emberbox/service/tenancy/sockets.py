"""Open WebSockets per tenant (terminals, port forwards): each holds a connection, a
task and a guest process, so a tenant may hold at most ``tenant_max_websockets``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

from emberbox import errors


class SocketSlots:
    """Counts of open sockets by tenant id; :meth:`hold` takes one for a ``with``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    def used(self, tenant_id: str) -> int:
        return self._open.get(tenant_id, 0)

    def hold(self, tenant_id: str) -> AbstractContextManager[None]:
        """Take a slot now (QuotaExceeded, 403 ``tenant_max_websockets``, when the tenant
        holds the limit already); it is given back when the returned ``with`` ends."""
        used = self.used(tenant_id)
        if used >= self.limit:
            raise errors.QuotaExceeded(
                f"tenant quota tenant_max_websockets={self.limit} exceeded: the tenant holds "
                f"{used} open WebSockets; close one first",
                quota="tenant_max_websockets",
                limit=self.limit,
                used=used,
            )
        self._open[tenant_id] = used + 1
        return self._release(tenant_id)

    @contextmanager
    def _release(self, tenant_id: str) -> Iterator[None]:
        try:
            yield
        finally:
            left = self._open[tenant_id] - 1
            if left:
                self._open[tenant_id] = left
            else:
                del self._open[tenant_id]
