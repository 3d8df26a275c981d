"""``EMBERBOX_METRICS_BIND=HOST:PORT``: ``/metrics`` also on an address of its own, without a
key — for a Prometheus on the operator's private network (docs/observability.md).

A small threaded HTTP server (standard library) that answers ``GET /metrics`` only; each
scrape runs :func:`~emberbox.service.sandboxes.scrape.scrape` on the app's event loop and
waits for it. It starts and stops with the app's lifespan.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from emberbox import errors

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SCRAPE_TIMEOUT_S = 30.0

Scrape = Callable[[], Coroutine[Any, Any, bytes]]


def parse_bind(bind: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9464`` for IPv6) as a host and a port; HostError if not."""
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise errors.HostError(f"EMBERBOX_METRICS_BIND must be HOST:PORT, got {bind!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _handler(scrape: Scrape, loop: asyncio.AbstractEventLoop) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] != "/metrics":
                self.send_error(404, "only /metrics is served here")
                return
            try:
                body = asyncio.run_coroutine_threadsafe(scrape(), loop).result(SCRAPE_TIMEOUT_S)
            except Exception:
                log.exception("metrics listener: the scrape failed")
                self.send_error(500, "the scrape failed (see the server log)")
                return
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per scrape would drown the log

    return Handler


@contextmanager
def metrics_listener(bind: str, scrape: Scrape) -> Iterator[tuple[str, int]]:
    """Serve ``scrape()`` at ``http://bind/metrics`` until the block ends; yields the
    bound address (port 0 picks a free one). Call from the app's event loop."""
    host, port = parse_bind(bind)
    loop = asyncio.get_running_loop()
    try:
        server = ThreadingHTTPServer((host, port), _handler(scrape, loop))
    except OSError as exc:
        raise errors.HostError(f"cannot listen for metrics on {bind}: {exc}") from exc
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    address = server.server_address
    log.info("metrics without a key on http://%s:%d/metrics", address[0], address[1])
    try:
        yield str(address[0]), int(address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
