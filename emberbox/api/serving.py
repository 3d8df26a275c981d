"""How ``emberbox serve`` runs uvicorn under hostile load: connections, timeouts, fds.

uvicorn's defaults leave a connection open for as long as its client trickles headers
(its keep-alive timeout starts only after a first response), accept connections without
bound and trust ``X-Forwarded-For`` from 127.0.0.1. Here:

- :func:`guarded_protocol` closes a connection whose request headers are not complete
  within ``request_header_timeout_s`` of its first byte (or of the connection, if it
  sends none), and closes at once any connection beyond ``max_connections``;
- bodies get their deadline and size limit from :class:`emberbox.api.limits.BodyGuard`;
- proxy headers are trusted only from ``forwarded_allow_ips`` (default: nobody);
- :func:`raise_fd_limit` lifts the soft ``RLIMIT_NOFILE`` to the hard one at start, so
  ``max_connections`` sockets and the VMs' files fit.
"""

from __future__ import annotations

import asyncio
import resource
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from emberbox.config import Settings

# Headers of one request (h11's own default, stated): a bigger head is a 431/400.
MAX_HEADER_BYTES = 16 * 1024


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a header deadline and a connection cap."""

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                self.transport.close()  # no 503 to write: the cap protects fds and memory
                return
            self._watch_headers()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_timer()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._stop_timer()  # idle now: the keep-alive timeout takes over
            self._watch_headers()  # ... unless a body is still owed

        def _watch_headers(self) -> None:
            """A timer while the client owes us bytes nobody waits for, none otherwise."""
            if self.transport.is_closing():
                return
            if self._stalled() and self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout_s, self._too_late)
            elif not self._stalled():
                self._stop_timer()

        def _stalled(self) -> bool:
            """Headers begun (or a fresh connection) but not complete; or a body still
            coming after its response went out (a route that did not read it)."""
            state = self.conn.their_state
            if state is h11.IDLE:
                return self.cycle is None or bool(self.conn.trailing_data[0])
            answered = self.cycle is not None and self.cycle.response_complete
            return state is h11.SEND_BODY and answered

        def _too_late(self) -> None:
            self._header_timer = None
            if self._stalled() and not self.transport.is_closing():
                self.transport.close()

        def _stop_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

    return GuardedH11Protocol


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The keyword arguments of ``uvicorn.Config`` for ``settings`` (a pure function)."""
    trusted = list(settings.forwarded_allow_ips)
    return {
        "host": settings.host,
        "port": settings.port,
        "http": guarded_protocol(settings.request_header_timeout_s, settings.max_connections),
        "limit_concurrency": settings.max_connections,
        "timeout_keep_alive": settings.keep_alive_timeout_s,
        "h11_max_incomplete_event_size": MAX_HEADER_BYTES,
        "proxy_headers": bool(trusted),
        "forwarded_allow_ips": trusted or [],
        "log_config": None,
        "access_log": False,  # our middleware logs each request, with its id and duration
    }


def raise_fd_limit() -> tuple[int, int]:
    """Lift the soft RLIMIT_NOFILE to the hard limit; the (soft, hard) now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # e.g. an unlimited hard limit the kernel caps
            pass
    return soft, hard
