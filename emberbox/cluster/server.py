"""The host's ``emberbox serve`` child: its environment (pure), start, readiness, stop.

The child is an unmodified single-host server on the host's own data dir. It runs in its
own session (a signal meant for the Ray worker does not reach it) and gets SIGKILL when
the thread that started it ends (``PR_SET_PDEATHSIG``): :class:`ServerProcess` starts
it from a keeper thread that lives exactly as long as the child, so the child never
outlives the actor's process, even when Ray kills that process without warning.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import httpx

from emberbox.errors import HostError

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
READY_TIMEOUT_S = 120.0  # a first start may build the database and check the images
STOP_TIMEOUT_S = 30.0
# Settings of the operator's environment that must not reach a host's server: it is a
# single-host server with its own SQLite, never a cluster replica itself.
DROPPED_ENV = (
    "EMBERBOX_URL",
    "EMBERBOX_CLUSTER_ADDRESS",
    "EMBERBOX_DATABASE_URL",
    "EMBERBOX_DATA_DIR",
    "EMBERBOX_HOST",
    "EMBERBOX_PORT",
    "EMBERBOX_API_KEY",
)
# Ray's own settings, its auth token among them: the server has no use for them.
DROPPED_PREFIXES = ("RAY_",)
# Limits the API replicas already apply per tenant and per key: the host server sees
# every tenant's calls under its one admin key (one "local" tenant), so its own per-key
# rate limit and per-tenant WebSocket cap would throttle the whole cluster's traffic to
# the host. ``start_host``'s env overrides these.
HOST_DEFAULTS = {
    "EMBERBOX_RATE_LIMIT_PER_S": "1000000",
    "EMBERBOX_RATE_LIMIT_BURST": "1000000",
    "EMBERBOX_TENANT_MAX_WEBSOCKETS": "100000",
}
SERVE_ARGV = ("-c", "import sys; from emberbox.cli import main; sys.exit(main())", "serve")


def server_env(
    base: Mapping[str, str],
    extra: Mapping[str, str],
    *,
    data_dir: Path,
    host: str,
    port: int,
    key: str,
) -> dict[str, str]:
    """The child's environment: ``base`` (the worker's) without cluster or Ray settings
    (the Ray token stays out of the server and its VMs' reach), :data:`HOST_DEFAULTS`
    over it, ``extra`` (what ``start_host`` was given) over that, then what the agent
    decides."""
    env = {
        name: value
        for name, value in base.items()
        if name not in DROPPED_ENV and not name.startswith(DROPPED_PREFIXES)
    }
    env.update(HOST_DEFAULTS)
    env.update(extra)
    env.update(
        EMBERBOX_DATA_DIR=str(data_dir),
        EMBERBOX_HOST=host,
        EMBERBOX_PORT=str(port),
        EMBERBOX_API_KEY=key,
    )
    return env


def free_port(host: str) -> int:
    """A port free on ``host`` now (the child binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


def _die_with_parent(parent: int) -> Callable[[], None]:
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork

    def preexec() -> None:
        if prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent died before prctl: nobody would kill us
            os._exit(1)

    return preexec


class ServerProcess:
    """One ``emberbox serve`` child. ``on_exit`` runs (in the keeper thread) when the
    child, once ready, ends without :meth:`stop` having been called."""

    def __init__(
        self, env: Mapping[str, str], log_path: Path, on_exit: Callable[[int], None]
    ) -> None:
        self._env = dict(env)
        self._log_path = log_path
        self._on_exit = on_exit
        self._process: subprocess.Popen[bytes] | None = None
        self._started = threading.Event()
        self._stopping = False
        self._ready = False  # it answered once: a later exit is a crash (on_exit)
        self._error: BaseException | None = None
        self._keeper = threading.Thread(target=self._keep, name="emberbox-server", daemon=True)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self, url: str, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Start the child; return once ``url``/healthz answers (HostError otherwise)."""
        self._keeper.start()
        self._started.wait()
        if self._error is not None or self._process is None:
            raise HostError(f"could not start the host server: {self._error}")
        try:
            self._wait_ready(url, timeout_s)
        except BaseException:
            self.stop()
            raise
        self._ready = True

    def _keep(self) -> None:
        try:
            with self._log_path.open("ab") as out:
                self._process = subprocess.Popen(
                    [sys.executable, *SERVE_ARGV],
                    env=self._env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    start_new_session=True,
                    preexec_fn=_die_with_parent(os.getpid()),
                )
        except OSError as exc:
            self._error = exc
            return
        finally:
            self._started.set()
        code = self._process.wait()
        if self._ready and not self._stopping:  # (a failed start raises from start())
            log.error("the host server exited with %s", code)
            self._on_exit(code)

    def _wait_ready(self, url: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                raise HostError(
                    f"the host server exited at start ({self._log_path}):\n{self.log_tail()}"
                )
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise HostError(
            f"the host server did not answer in {timeout_s:.0f} s; see {self._log_path}"
        )

    def log_tail(self, lines: int = 6) -> str:
        """The last lines of the server's log (why it did not start)."""
        try:
            with self._log_path.open("rb") as log_file:
                log_file.seek(max(0, self._log_path.stat().st_size - 8192))
                text = log_file.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM to the child's process group, SIGKILL after ``timeout_s``; idempotent.

        The server leaves its VMs running when it stops (they have their own sessions);
        the next start on the same data dir re-adopts them."""
        self._stopping = True
        process = self._process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
