"""Terminal tickets: how a browser opens the PTY WebSocket without putting its key in a
URL (browsers cannot set headers on a WebSocket).

The console asks ``POST /v1/sandboxes/{id}/pty/ticket`` with its key, as any API call,
and gets a random ticket that opens that one sandbox's terminal, once, within
``pty_ticket_ttl_s`` seconds, as the tenant (and key) that asked for it::

    issue(principal, sandbox_id) -> ticket      (256 random bits, URL-safe base64)
    redeem(ticket, sandbox_id)   -> principal   (the ticket is gone either way)

A ticket that is unknown, used, expired or for another sandbox is ``Unauthorized``,
with one message for all four so that a caller learns nothing from which it was.
Tickets live in memory (a restart forgets them; they are seconds long anyway), keyed by
their SHA-256, at most ``max_tickets`` at once: past that the oldest is dropped.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from emberbox import errors

if TYPE_CHECKING:
    from emberbox.service.tenancy.access import Principal

TICKET_BYTES = 32
BAD_TICKET = "unknown, used or expired terminal ticket (ask POST .../pty/ticket for a new one)"


@dataclass(frozen=True)
class _Ticket:
    principal: Principal
    sandbox_id: str
    expires_at: float  # monotonic seconds


class TicketBook:
    """Single-use, short-lived terminal tickets, bound to a principal and a sandbox."""

    def __init__(
        self, ttl_s: float, max_tickets: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl_s = ttl_s
        self._max = max_tickets
        self._clock = clock
        self._tickets: dict[str, _Ticket] = {}  # by digest, oldest first

    def __len__(self) -> int:
        return len(self._tickets)

    def issue(self, principal: Principal, sandbox_id: str) -> str:
        """A new ticket for ``principal`` to open ``sandbox_id``'s terminal once."""
        now = self._clock()
        self._drop_expired(now)
        while len(self._tickets) >= self._max:  # a flood: the oldest go first
            del self._tickets[next(iter(self._tickets))]
        ticket = secrets.token_urlsafe(TICKET_BYTES)
        self._tickets[_digest(ticket)] = _Ticket(principal, sandbox_id, now + self.ttl_s)
        return ticket

    def redeem(self, ticket: str, sandbox_id: str) -> Principal:
        """The principal the ticket was issued to; Unauthorized unless it is live and for
        ``sandbox_id``. Used up either way: a ticket is tried once."""
        found = self._tickets.pop(_digest(ticket), None)
        if found is None or found.expires_at <= self._clock() or found.sandbox_id != sandbox_id:
            raise errors.Unauthorized(BAD_TICKET)
        return found.principal

    def _drop_expired(self, now: float) -> None:
        # One lifetime for all: the oldest expire first.
        while self._tickets:
            oldest = next(iter(self._tickets))
            if self._tickets[oldest].expires_at > now:
                return
            del self._tickets[oldest]


def _digest(ticket: str) -> str:
    return hashlib.sha256(ticket.encode()).hexdigest()
