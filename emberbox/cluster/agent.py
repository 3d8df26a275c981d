"""HostAgent: the Ray actor on each host (``hosts.start_host`` makes it one).

It starts the host's ``emberbox serve`` (server.py) on the node's cluster address with a
fresh random admin key, answers once that server is ready, and reports the host's
capacity. If the server dies on its own, the actor's process exits so that Ray restarts
the actor (``max_restarts=-1``): the new server re-adopts the VMs on the same data dir.

The draining flag is kept in the data dir (``cluster.json``): a restarted host stays
drained. The admin key is never logged; it leaves the actor only through
:meth:`HostAgent.endpoint`, to API replicas of the same Ray cluster.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from emberbox.cluster import server
from emberbox.config import Settings

log = logging.getLogger(__name__)

STATUS_HTTP_TIMEOUT_S = 1.5
REFRESH_S = 1.0  # how old the sandbox count in a status may be
IMAGES_REFRESH_S = 10.0  # and its image names (a new image shows within this)
STALE_S = 5.0  # no answer from the server for this long: not serving
STATE_FILE = "cluster.json"


def node_ip() -> str:
    import ray  # only inside cluster mode

    return str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]


def node_id() -> str:
    import ray

    return str(ray.get_runtime_context().get_node_id())


def free_memory_mib(meminfo: str) -> int:
    """``MemAvailable`` of a ``/proc/meminfo`` text, in MiB (0 when absent)."""
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 0


def max_sandboxes_of(env: Mapping[str, str]) -> int:
    """The child's ``max_sandboxes`` as its Settings read it from ``env`` (names are
    case-insensitive there). Read here without touching this process's environment,
    which Ray's own threads read too."""
    for name, value in env.items():
        if name.upper() == "EMBERBOX_MAX_SANDBOXES":
            return int(value)  # a bad value: the server refuses to start, with the reason
    return int(Settings.model_fields["max_sandboxes"].default)


class HostAgent:
    """One host: its server child, its draining flag, its status."""

    def __init__(self, name: str, data_dir: str, env: Mapping[str, str], port: int = 0) -> None:
        self._name = name
        self._data_dir = Path(data_dir)
        self._data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # production mode
        host = node_ip()
        port = port or server.free_port(host)
        self._key = secrets.token_hex(32)
        self._url = f"http://{host}:{port}"
        child_env = server.server_env(
            os.environ, env, data_dir=self._data_dir, host=host, port=port, key=self._key
        )
        self._max_sandboxes = max_sandboxes_of(child_env)
        self._draining = bool(self._read_state().get("draining", False))
        self._server = server.ServerProcess(
            child_env, self._data_dir / "host-server.log", on_exit=self._server_died
        )
        self._server.start(self._url)
        self._capacity: tuple[float, int, tuple[str, ...]] | None = None
        self._stopping = threading.Event()
        self._first_read = threading.Event()
        self._refresher = threading.Thread(
            target=self._refresh_capacity, name="emberbox-capacity", daemon=True
        )
        self._refresher.start()
        self._first_read.wait(STALE_S)  # the first status already counts
        log.info("host %s serves on %s (data in %s)", name, self._url, self._data_dir)

    @staticmethod
    def _server_died(code: int) -> None:
        os._exit(1)  # Ray restarts the actor, which starts a new server

    def ping(self) -> str:
        return self._name

    def endpoint(self) -> tuple[str, str]:
        """The server's base URL and its admin key."""
        return self._url, self._key

    def drain(self, on: bool) -> None:
        self._draining = on
        self._write_state({"draining": on})

    def status(self) -> dict[str, Any]:
        """What placement needs (see hosts.HostStatus), at once: the server's sandbox
        count and images as the refresher last read them (at most ``REFRESH_S`` old).
        ``serving`` is False when the server has not answered for ``STALE_S``: the host
        takes no sandbox then, but its actor answered, so the host is not counted down."""
        meminfo = Path("/proc/meminfo").read_text()
        read = self._capacity
        serving = read is not None and time.monotonic() - read[0] < STALE_S
        return {
            "name": self._name,
            "url": self._url,
            "draining": self._draining,
            "serving": serving,
            "sandboxes": read[1] if read and serving else 0,
            "max_sandboxes": self._max_sandboxes,
            "free_memory_mib": free_memory_mib(meminfo),
            "images": list(read[2]) if read and serving else [],
            "node_id": node_id(),
        }

    def _refresh_capacity(self) -> None:
        """Every ``REFRESH_S`` the live sandbox count (``/healthz``: keyless, cheap, not in
        the server's request log), every ``IMAGES_REFRESH_S`` the images (admin key)."""
        answered, names_at = True, -IMAGES_REFRESH_S
        names: tuple[str, ...] = ()
        with httpx.Client(
            base_url=self._url,
            headers={"Authorization": f"Bearer {self._key}"},
            timeout=STATUS_HTTP_TIMEOUT_S,
        ) as client:
            while True:
                try:
                    live = int(client.get("/healthz").raise_for_status().json()["sandboxes"])
                    if time.monotonic() - names_at >= IMAGES_REFRESH_S:
                        images = client.get("/v1/images").raise_for_status().json()
                        names = tuple(sorted(str(image["name"]) for image in images))
                        names_at = time.monotonic()
                    self._capacity = (time.monotonic(), live, names)
                    answered = True
                except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                    if answered:
                        log.warning("host %s: its server does not answer: %s", self._name, exc)
                    answered = False
                self._first_read.set()
                if self._stopping.wait(REFRESH_S):
                    return

    def shutdown(self) -> None:
        """Stop the server (its VMs keep running; a new start re-adopts them)."""
        self._stopping.set()
        self._server.stop()

    def __ray_shutdown__(self) -> None:
        self.shutdown()

    def _read_state(self) -> dict[str, Any]:
        try:
            state: dict[str, Any] = json.loads((self._data_dir / STATE_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return state

    def _write_state(self, state: dict[str, Any]) -> None:
        path = self._data_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(path)
