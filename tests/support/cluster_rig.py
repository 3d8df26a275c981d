"""The real cluster rig of tests/cluster (its fixture is tests/cluster/conftest.py): the
API replicas as subprocesses (:class:`Replica`), and :class:`Rig`, what the tests talk to
(replicas, keys, the PostgreSQL index, the QEMU processes under each host's data dir)."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.keys import CLI
from tests.support.paths import REPO, qemu_pids_under
from tests.support.raycluster import RayCluster

HOSTS = ("h1", "h2", "h3")
MAX_PER_HOST = 2  # EMBERBOX_MAX_SANDBOXES of each host's server
NETWORKS = {"h1": "10.225.0.0/16", "h2": "10.226.0.0/16", "h3": "10.227.0.0/16"}
HOST_START_S = 300.0
REPLICA_START_S = 90.0
TENANT_QUOTAS = ("--max-sandboxes", "12", "--max-vcpus", "12", "--max-memory-mib", "12288")


def pids_with_env(text: str) -> list[int]:
    """Processes whose environment contains ``text`` (e.g. the host servers of a data dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            with contextlib.suppress(OSError):
                if text.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
    return found


def clean_env(env: dict[str, str]) -> dict[str, str]:
    """This process's environment without its EMBERBOX_* and RAY_AUTH_* settings (the
    operator's own server URL, key or data dir must not leak in), with ``env`` over it."""
    base = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("EMBERBOX_", "RAY_AUTH_"))
    }
    return {**base, **env}


def cli(
    env: dict[str, str], *args: str, timeout_s: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """``emberbox ARGS`` as an operator runs it, with ``env`` over this process's."""
    return subprocess.run(
        [sys.executable, "-c", CLI, *args],
        cwd=REPO,
        env=clean_env(env),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


@dataclass
class Replica:
    """One ``emberbox serve --cluster`` subprocess; :meth:`kill` and :meth:`start` again."""

    name: str
    port: int
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = [sys.executable, "-c", CLI, "serve", "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--cluster", self.env["EMBERBOX_CLUSTER_ADDRESS"]]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, cwd=REPO, env=clean_env(self.env), stdout=log, stderr=log
            )
        deadline = time.monotonic() + REPLICA_START_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"replica {self.name} exited:\n{self.log_tail()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"replica {self.name} did not answer /healthz:\n{self.log_tail()}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-6000:]
        return ""


@dataclass
class Rig:
    """Everything the cluster tests talk to."""

    database_url: str
    ray: RayCluster
    root: Path  # host data dirs root/<host>, replica dirs root/replica-<n>
    replicas: list[Replica]
    admin_key: str
    keys: dict[str, str] = field(default_factory=dict)  # tenant name -> key

    def host_dir(self, name: str) -> Path:
        return self.root / name

    def admin(self, replica: int = 0) -> httpx.Client:
        """An HTTP client on replica ``replica`` with the admin key."""
        return self.client(self.admin_key, replica)

    def client(self, key: str, replica: int = 0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"}
        return httpx.Client(base_url=self.replicas[replica].url, headers=headers, timeout=300)

    def host_of(self, sandbox_id: str) -> tuple[str | None, str]:
        """(host, state) of a sandbox in the PostgreSQL index, read directly."""
        import psycopg

        with psycopg.connect(self.database_url) as conn:
            row = conn.execute(
                "SELECT host, state FROM sandboxes WHERE id = %s", (sandbox_id,)
            ).fetchone()
        assert row is not None, f"{sandbox_id} is not in the index"
        return row[0], row[1]

    def live_per_host(self) -> dict[str, int]:
        """Sandboxes creating or running per host, in the PostgreSQL index."""
        import psycopg

        with psycopg.connect(self.database_url) as conn:
            rows = conn.execute(
                "SELECT host, count(*) FROM sandboxes"
                " WHERE state IN ('creating', 'running') GROUP BY host"
            ).fetchall()
        return {str(host): int(count) for host, count in rows if host}

    def wait_hosts_report(self, names: Iterable[str], timeout_s: float = 15.0) -> None:
        """Until the admin view's sandbox counts of ``names`` match the index: hosts
        report their counts about every second, and placement uses what they reported,
        so a test that is not about placement waits for them between creates."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self.admin() as admin:
                hosts = admin.get("/v1/cluster/hosts").json()["hosts"]
            view = {host["name"]: host["sandboxes"] for host in hosts}
            live = self.live_per_host()
            if all(view.get(name) == live.get(name, 0) for name in names):
                return
            assert time.monotonic() < deadline, f"hosts report {view}, the index {live}"
            time.sleep(0.2)

    def vm_ids_on(self, name: str) -> set[str]:
        """Sandbox ids of the QEMU processes running under host ``name``'s data dir."""
        vms = self.host_dir(name) / "vms"
        found = set()
        for pid in qemu_pids_under(vms):
            with contextlib.suppress(OSError):
                args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                for arg in args:
                    text = arg.decode(errors="replace")
                    if str(vms) + "/" in text:
                        found.add(text.split(str(vms) + "/", 1)[1].split("/", 1)[0])
        return found

    def host_rows(self, name: str) -> dict[str, str]:
        """Sandbox id -> state in host ``name``'s own SQLite (read-only)."""
        path = self.host_dir(name) / "emberbox.db"
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            return dict(conn.execute("SELECT id, state FROM sandboxes").fetchall())

    def sandbox_vms_on(self, name: str) -> set[str]:
        """QEMUs of host ``name`` that are sandboxes of its server (a row in its SQLite).
        The others are spare VMMs: idle QEMUs started ahead of a restore, with no guest
        and no row until a create claims one (emberbox/service/vm/spares.py)."""
        return self.vm_ids_on(name) & set(self.host_rows(name))

    def kill_all_sandboxes(self) -> None:
        """Delete every live sandbox through a replica (admin key)."""
        with self.admin() as client:
            listed = client.get("/v1/sandboxes")
            listed.raise_for_status()
            for sandbox in listed.json()["sandboxes"]:
                if sandbox["state"] not in ("stopped", "error"):
                    client.delete(f"/v1/sandboxes/{sandbox['id']}")
