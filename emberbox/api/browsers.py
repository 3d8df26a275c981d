"""What a browser's WebSocket brings instead of headers: a terminal ticket in its
subprotocols, and an ``Origin`` that must be the server's own.

A browser cannot set ``Authorization`` on a WebSocket, and a key in the URL would end
up in logs and history. So the console first asks ``POST /v1/sandboxes/{id}/pty/ticket``
(an ordinary API call, with its key) and opens the socket with two subprotocols::

    new WebSocket(url, ["emberbox.pty", "emberbox.ticket.<ticket>"])

The server accepts with ``emberbox.pty`` (never echoing the ticket). Any WebSocket that
sends an ``Origin`` (every browser does) must come from the server's own origin (the
``Host`` it was reached at) or one of ``websocket_allowed_origins``; clients that send
no ``Origin`` (the SDK, scripts) are not affected.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

from emberbox import errors

PTY_PROTOCOL = "emberbox.pty"
TICKET_PREFIX = "emberbox.ticket."
DEFAULT_PORTS = {"http": 80, "https": 443}


def offered_ticket(protocols: Iterable[str]) -> str | None:
    """The ticket among the offered subprotocols; None when none carries one."""
    for protocol in protocols:
        if protocol.startswith(TICKET_PREFIX) and len(protocol) > len(TICKET_PREFIX):
            return protocol.removeprefix(TICKET_PREFIX)
    return None


def chosen_protocol(protocols: Iterable[str]) -> str | None:
    """The subprotocol the server answers with: ``emberbox.pty`` when offered."""
    return PTY_PROTOCOL if PTY_PROTOCOL in protocols else None


def origin_allowed(origin: str, host: str | None, allowed: Sequence[str]) -> bool:
    """Whether a WebSocket from the page at ``origin`` may reach the server reached as
    ``host`` (the Host header): the same host and port, or listed in ``allowed``.

    The scheme is not compared (a TLS proxy in front makes the page https while the
    server sees ws); a Host without a port means the origin scheme's default port.
    """
    wanted = _normal(origin)
    if wanted is None:
        return False
    if wanted in {_normal(entry) for entry in allowed}:
        return True
    if not host:
        return False
    scheme, hostname, port = wanted
    try:
        reached = urlsplit(f"//{host}")
        reached_port = reached.port or DEFAULT_PORTS[scheme]
    except ValueError:
        return False
    return (reached.hostname or "") == hostname and reached_port == port


def check_origin(origin: str | None, host: str | None, allowed: Sequence[str]) -> None:
    """Unauthorized for a browser page of another origin; nothing without an Origin."""
    if origin is not None and not origin_allowed(origin, host, allowed):
        raise errors.Unauthorized(
            f"WebSocket from origin {origin[:100]!r} refused: only the server's own origin "
            "or EMBERBOX_WEBSOCKET_ALLOWED_ORIGINS may open terminals"
        )


def _normal(origin: str) -> tuple[str, str, int] | None:
    """``(scheme, host, port)`` of an http(s) origin, the port made explicit; None for
    anything else (``null``, a path, another scheme)."""
    try:
        parts = urlsplit(origin.strip().lower())
        if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
            return None
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
            return None
        return parts.scheme, parts.hostname, parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError:  # a port out of range or not a number
        return None
