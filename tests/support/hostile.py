"""The hostile suite's servers and checks: :func:`hostile_server` runs ``emberbox serve``
(see :func:`tests.support.servers.serve_emberbox`) and owns it: on the way out it kills
every sandbox, checks that none left a VMM, work dir or host cgroup, and stops the
server. A :class:`Bystander` is a sandbox that must keep answering whatever the other
guests do; a :class:`Case` is one row of the report (see :mod:`tests.support.measure`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support.measure import Sampler, mem_available_mib
from tests.support.paths import qemu_pids_under, short_tmp_dir
from tests.support.servers import Server, serve_emberbox

REQUEST_TIMEOUT_S = 120.0
BYSTANDER_BOUND_S = 15.0  # a bystander's command answers within this, whatever else runs
HEALTH_BOUND_S = 5.0
MIN_HOST_MEM_MIB = 256
ACK_PATH = "/root/acknowledged.txt"
CGROUP_ROOT = Path("/sys/fs/cgroup")
HostileCase = Callable[..., contextlib.AbstractContextManager["Case"]]


@dataclass(frozen=True)
class HostileServer:
    """A running ``emberbox serve`` with the environment it was started with."""

    server: Server
    env: dict[str, str]

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def data_dir(self) -> Path:
        return self.server.settings.data_dir

    @property
    def pid(self) -> int:
        return self.server.process.pid

    def client(self, key: str | None = None, timeout_s: float = REQUEST_TIMEOUT_S) -> httpx.Client:
        """A client that sends ``key`` (default: the server's admin key, if it has one)."""
        key = key or self.env.get("EMBERBOX_API_KEY") or os.environ.get("EMBERBOX_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, timeout=timeout_s, headers=headers)

    def create(self, client: httpx.Client, **body: Any) -> str:
        response = client.post("/v1/sandboxes", json=body)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])


def kill_everything(server: HostileServer) -> None:
    """Kill every sandbox of the server through its API (they outlive the server);
    none may leave a VMM, a work dir or a host cgroup behind."""
    with server.client() as client:
        listing = client.get("/v1/sandboxes")
        assert listing.status_code == 200, listing.text
        sandboxes = listing.json()["sandboxes"]
        for sandbox in sandboxes:
            if sandbox["state"] != "stopped":
                client.delete(f"/v1/sandboxes/{sandbox['id']}")
    for sandbox in sandboxes:
        assert_cleaned_up(server, sandbox["id"])


@contextlib.contextmanager
def hostile_server(
    env: dict[str, str] | None = None, data_dir: Path | None = None
) -> Iterator[HostileServer]:
    """A server with ``env`` (no warm pool unless asked) on ``data_dir`` (default: a new
    temp dir, removed afterwards). On the way out every sandbox is killed, the server
    stops, and no VMM may be left under the data dir."""
    env = {"EMBERBOX_POOL_SIZE": "0", **(env or {})}
    with contextlib.ExitStack() as stack:
        if data_dir is None:
            data_dir = short_tmp_dir("eb-hostile-")
            stack.callback(shutil.rmtree, data_dir, True)
        stack.callback(_no_vmm_left, data_dir)
        running = HostileServer(stack.enter_context(serve_emberbox(data_dir, **env)), env)
        stack.callback(_kill_if_up, running)
        yield running


def _kill_if_up(server: HostileServer) -> None:
    if server.server.process.poll() is None:
        kill_everything(server)


def _no_vmm_left(data_dir: Path) -> None:
    leftovers = qemu_pids_under(data_dir)
    for pid in leftovers:
        subprocess.run(["kill", "-9", str(pid)], check=False)
    assert not leftovers, f"VMM processes left running under {data_dir}: {leftovers}"


@dataclass
class Bystander:
    """A sandbox that only watches: after each case it must still answer promptly and
    still hold the file it acknowledged before the cases began."""

    server: HostileServer
    sandbox_id: str
    content: bytes
    answer_s: list[float] = field(default_factory=list)

    def check(self) -> float:
        """Assert the host, the server and this sandbox are healthy; the answer time."""
        assert_host_healthy(self.server)
        with self.server.client(timeout_s=BYSTANDER_BOUND_S) as client:
            started = time.monotonic()
            url = f"/v1/sandboxes/{self.sandbox_id}"
            response = client.post(f"{url}/exec", json={"cmd": "echo bystander", "timeout_s": 10})
            elapsed = time.monotonic() - started
            assert response.status_code == 200, response.text
            assert response.json()["stdout"] == "bystander\n"
            assert elapsed < BYSTANDER_BOUND_S
            assert client.get(f"{url}/files", params={"path": ACK_PATH}).content == self.content
        self.answer_s.append(elapsed)
        return elapsed


def put_acknowledged(client: httpx.Client, sandbox_id: str, content: bytes) -> None:
    """Write ACK_PATH and sync it to the guest's disk: acknowledged data."""
    url = f"/v1/sandboxes/{sandbox_id}"
    response = client.put(f"{url}/files", params={"path": ACK_PATH}, content=content)
    assert response.status_code == 200, response.text
    assert client.post(f"{url}/exec", json={"cmd": "sync"}).json()["exit_code"] == 0


def assert_host_healthy(server: HostileServer) -> None:
    """The server process lives and answers /healthz promptly; the host has memory."""
    assert server.server.process.poll() is None, "the server died"
    started = time.monotonic()
    health = httpx.get(f"{server.url}/healthz", timeout=HEALTH_BOUND_S)
    assert health.status_code == 200, health.text
    assert time.monotonic() - started < HEALTH_BOUND_S
    assert mem_available_mib() >= MIN_HOST_MEM_MIB


def host_cgroups(sandbox_id: str) -> list[Path]:
    """Host cgroup directories of a VM (v2 and each v1 controller)."""
    found = list(CGROUP_ROOT.glob(f"*/emberbox/{sandbox_id}"))
    return found + [p for p in [CGROUP_ROOT / "emberbox" / sandbox_id] if p.exists()]


def assert_cleaned_up(server: HostileServer, sandbox_id: str) -> None:
    """No VMM process, work dir or host cgroup of the sandbox is left."""
    work_dir = server.data_dir / "vms" / sandbox_id
    assert qemu_pids_under(work_dir) == []
    assert not work_dir.exists(), sorted(p.name for p in work_dir.iterdir())
    assert host_cgroups(sandbox_id) == []


def wait_for_state(
    client: httpx.Client, sandbox_id: str, states: set[str], within_s: float
) -> dict[str, Any]:
    deadline = time.monotonic() + within_s
    while True:
        record: dict[str, Any] = client.get(f"/v1/sandboxes/{sandbox_id}").json()
        if record["state"] in states or time.monotonic() > deadline:
            assert record["state"] in states, record
            return record
        time.sleep(0.2)


@dataclass
class Case:
    """What a case says about itself for its row; set ``outcome`` (and ``contained_by``)."""

    name: str
    contained_by: str
    sampler: Sampler
    outcome: str = ""
