"""The real server (``emberbox serve`` in a subprocess) over real VMs, through HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from emberbox.images.registry import ImageInfo
from tests.support.paths import pids_mentioning, qemu_pids_under
from tests.support.servers import Server, serve_emberbox

pytestmark = [pytest.mark.vm]


@pytest.fixture
def anyio_backend() -> str:
    """Run async tests on asyncio only."""
    return "asyncio"


@pytest.fixture
def server(data_dir: Path, default_image: ImageInfo) -> Iterator[Server]:
    """A real server with a private data dir and the user's image cache."""
    with serve_emberbox(data_dir) as running:
        yield running


def _error_type(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["message"], body
    return str(body["error"]["type"])


# --- the seed's requests -----------------------------------------------------------------


def test_seed_curl_requests(server: Server, default_image: ImageInfo) -> None:
    """The seed's two curl requests, with a registered image's files as the paths."""
    images_dir = server.settings.images_dir / default_image.name
    body = {
        "name": "basic_demo",
        "user_id": "c59837c4-e757-4f73-b4f0-cd60a0e0dcbc",
        "root_image_path": str(images_dir / default_image.files.rootfs.name),
        "kernel_path": str(default_image.files.kernel),
    }
    with server.client() as client:
        response = client.post("/vm/create", json=body)
        assert response.status_code == 200, response.text
        created = response.json()
        assert set(created) == {"ip_address", "vm_id"}
        command = {"vm_id": created["vm_id"], "command": "echo Hello World"}
        answer = client.post("/exec/command", json=command).json()
        assert answer == {"success": True, "output": "Hello World\n", "exit_code": 0}
        failing = {"vm_id": created["vm_id"], "command": "echo oops >&2; exit 4"}
        assert client.post("/exec/command", json=failing).json() == {
            "success": False,
            "output": "oops\n",
            "exit_code": 4,
        }
        sandbox = client.get(f"/v1/sandboxes/{created['vm_id']}").json()
        assert sandbox["metadata"] == {"name": body["name"], "user_id": body["user_id"]}


def test_seed_refuses_host_paths(server: Server, default_image: ImageInfo) -> None:
    """Host paths that are not a registered image's files are 400 and boot nothing."""
    rootfs = default_image.files.rootfs
    bad = [
        {"root_image_path": "/etc/passwd"},
        {"kernel_path": "/etc/shadow"},
        {"root_image_path": f"{rootfs.parent}/../../../../etc/passwd"},
        {"root_image_path": str(default_image.files.kernel)},  # right image, wrong file
        {"root_image_path": str(server.settings.data_dir)},
        {"root_image_path": "/proc/self/root/etc/passwd"},
    ]
    with server.client() as client:
        for paths in bad:
            response = client.post("/vm/create", json={"name": "n", "user_id": "u", **paths})
            assert response.status_code == 400, (paths, response.text)
            assert _error_type(response) == "InvalidRequest"
        assert client.get("/v1/sandboxes").json()["sandboxes"] == []


# --- concurrency -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_five_sandboxes_twenty_concurrent_execs_each(server: Server) -> None:
    """100 execs in flight over 5 sandboxes: every answer is its own command's output."""
    async with server.async_client() as client:
        responses = await asyncio.gather(
            *(client.post("/v1/sandboxes", json={"metadata": {"n": str(i)}}) for i in range(5))
        )
        assert [r.status_code for r in responses] == [201] * 5, [r.text for r in responses]
        ids = [r.json()["id"] for r in responses]

        async def run(sandbox_id: str, j: int) -> tuple[str, int, dict[str, Any]]:
            cmd = f"sleep 0.{j % 5}; echo {sandbox_id}-{j}; echo err-{j} >&2; hostname; exit {j}"
            response = await client.post(
                f"/v1/sandboxes/{sandbox_id}/exec", json={"cmd": cmd, "timeout_s": 120}
            )
            assert response.status_code == 200, response.text
            return sandbox_id, j, response.json()

        results = await asyncio.gather(*(run(sid, j) for sid in ids for j in range(20)))
    hostnames: dict[str, str] = {}
    for sandbox_id, j, result in results:
        first, hostname = result["stdout"].splitlines()
        assert first == f"{sandbox_id}-{j}"
        assert result["stderr"] == f"err-{j}\n"
        assert result["exit_code"] == j
        assert hostnames.setdefault(sandbox_id, hostname) == hostname
    assert len(set(hostnames.values())) == 5  # five distinct guests answered


# --- lifetime ----------------------------------------------------------------------------


def test_timeout_stops_the_sandbox_and_cleans_up(server: Server) -> None:
    """timeout_s=5: stopped within 5 s + the reaper interval, work dir and VMM gone."""
    with server.client() as client:
        created = client.post("/v1/sandboxes", json={"timeout_s": 5})
        started = time.monotonic()
        assert created.status_code == 201, created.text
        sandbox_id = created.json()["id"]
        work_dir = server.settings.vms_dir / sandbox_id
        assert work_dir.is_dir()
        assert pids_mentioning(str(work_dir)), "no VMM process names the work dir"
        limit_s = 5 + server.settings.reaper_interval_s + 5  # +5: teardown and polling
        state = "running"
        while time.monotonic() - started < limit_s + 5:
            state = client.get(f"/v1/sandboxes/{sandbox_id}").json()["state"]
            if state == "stopped":
                break
            time.sleep(0.2)
        elapsed = time.monotonic() - started
        assert state == "stopped"
        assert elapsed <= limit_s, f"stopped after {elapsed:.1f} s"
        assert not work_dir.exists()
        assert pids_mentioning(str(work_dir)) == []
        response = client.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"cmd": "true"})
        assert (response.status_code, _error_type(response)) == (409, "Conflict")
        assert client.delete(f"/v1/sandboxes/{sandbox_id}").status_code == 204


def test_delete_twice_and_set_timeout(server: Server) -> None:
    """DELETE is 204 twice; the VMM and work dir are gone after the first."""
    with server.client() as client:
        sandbox_id = client.post("/v1/sandboxes", json={}).json()["id"]
        extended = client.post(f"/v1/sandboxes/{sandbox_id}/timeout", json={"timeout_s": 900})
        assert extended.json()["timeout_s"] == 900
        assert client.delete(f"/v1/sandboxes/{sandbox_id}").status_code == 204
        assert not (server.settings.vms_dir / sandbox_id).exists()
        assert qemu_pids_under(server.settings.vms_dir / sandbox_id) == []
        assert client.delete(f"/v1/sandboxes/{sandbox_id}").status_code == 204
        assert client.get(f"/v1/sandboxes/{sandbox_id}").json()["state"] == "stopped"


def test_exec_timeout_answers_timed_out(server: Server) -> None:
    """An exec past its timeout_s answers 200 with timed_out, promptly."""
    with server.client() as client:
        sandbox_id = client.post("/v1/sandboxes", json={}).json()["id"]
        started = time.monotonic()
        response = client.post(
            f"/v1/sandboxes/{sandbox_id}/exec", json={"cmd": "echo start; sleep 60", "timeout_s": 2}
        )
        assert response.status_code == 200, response.text
        assert response.json()["timed_out"] is True
        assert time.monotonic() - started < 20


# --- bad input ---------------------------------------------------------------------------


def test_bad_input_matrix_never_500s(server: Server) -> None:
    """Bad requests get the right 4xx and the error body; none is a 500."""
    settings = server.settings
    with server.client() as client:
        live = client.post("/v1/sandboxes", json={}).json()["id"]
        dead = client.post("/v1/sandboxes", json={}).json()["id"]
        client.delete(f"/v1/sandboxes/{dead}")
        raw = {"content-type": "application/json"}
        sbs, run, bad = "/v1/sandboxes", f"/v1/sandboxes/{live}/exec", "ValidationError"
        max_exec = settings.max_exec_timeout_s + 1
        seed_body = {"name": "n", "user_id": "u", "root_image_path": "/etc/passwd"}
        cases: list[tuple[str, str, dict[str, Any], int, str]] = [
            ("POST", sbs, {"json": {"vcpus": 0}}, 422, bad),
            ("POST", sbs, {"json": {"memory_mib": 10**9}}, 422, bad),
            ("POST", sbs, {"json": {"vcpus": settings.max_vcpus + 1}}, 400, ""),
            ("POST", sbs, {"json": {"memory_mib": settings.max_memory_mib + 1}}, 400, ""),
            ("POST", sbs, {"json": {"timeout_s": settings.max_timeout_s + 1}}, 400, ""),
            ("POST", sbs, {"json": {"image": "nope"}}, 400, "ImageNotFound"),
            ("POST", sbs, {"json": {"image": "../../etc"}}, 422, bad),
            ("POST", sbs, {"json": {"env": {"A=B": "c"}}}, 422, bad),
            ("POST", sbs, {"json": {"extra": 1}}, 422, bad),
            ("POST", sbs, {"content": b"{not json", "headers": raw}, 422, bad),
            ("POST", sbs, {"content": b"[]", "headers": raw}, 422, bad),
            ("POST", sbs, {"content": b"\xff", "headers": raw}, 400, "InvalidRequest"),
            ("GET", f"{sbs}?state=zombie", {}, 422, bad),
            ("GET", f"{sbs}?owner=me", {}, 400, "InvalidRequest"),
            ("GET", f"{sbs}/does-not-exist", {}, 404, "NotFound"),
            ("GET", f"{sbs}/{'x' * 500}", {}, 422, bad),
            ("DELETE", f"{sbs}/does-not-exist", {}, 404, "NotFound"),
            ("POST", f"{sbs}/does-not-exist/exec", {"json": {"cmd": "true"}}, 404, "NotFound"),
            ("POST", f"{sbs}/{dead}/exec", {"json": {"cmd": "true"}}, 409, "Conflict"),
            ("POST", run, {"json": {"cmd": []}}, 422, bad),
            ("POST", run, {"json": {"cmd": "x", "timeout_s": -1}}, 422, bad),
            ("POST", run, {"json": {"cmd": "x", "timeout_s": 10**9}}, 422, bad),
            ("POST", run, {"json": {"cmd": ["a\x00"]}}, 422, bad),
            ("POST", f"{sbs}/{live}/timeout", {"json": {"timeout_s": 0}}, 422, bad),
            ("POST", f"{sbs}/{live}/timeout", {"json": {"timeout_s": 10**7}}, 400, ""),
            ("POST", "/vm/create", {"json": {"name": "n"}}, 422, bad),
            ("POST", "/vm/create", {"json": seed_body}, 400, "InvalidRequest"),
            (
                "POST",
                "/exec/command",
                {"json": {"vm_id": "nope", "command": "ls"}},
                404,
                "NotFound",
            ),
            ("POST", "/exec/command", {"json": {"vm_id": live, "command": ""}}, 422, bad),
            ("GET", "/nowhere", {}, 404, "NotFound"),
            ("PATCH", sbs, {}, 405, "MethodNotAllowed"),
        ]
        for method, path, kwargs, status, type_name in cases:
            response = client.request(method, path, **kwargs)
            assert response.status_code == status, (method, path, kwargs, response.text)
            got = _error_type(response)
            assert got == type_name or not type_name, (method, path, got)
        # Inputs the service or the guest decides about: answered, never a 5xx. (An exec
        # timeout over Settings.max_exec_timeout_s is capped by the manager, not refused.)
        capped = {"cmd": "true", "timeout_s": max_exec}
        for body in ({"cmd": ["no-such-program"]}, {"cmd": "pwd", "cwd": "/no/such/dir"}, capped):
            response = client.post(f"/v1/sandboxes/{live}/exec", json=body)
            assert response.status_code < 500, response.text
        missing = client.post(f"/v1/sandboxes/{live}/exec", json={"cmd": ["no-such-program"]})
        assert missing.json()["exit_code"] == 127
        assert client.get("/healthz").json()["sandboxes"] == 1
    log = server.log_path.read_text(errors="replace")
    assert " 500 " not in log and "Traceback" not in log


def test_images_health_and_docs(server: Server, default_image: ImageInfo) -> None:
    """/v1/images lists the default image; /healthz and /docs answer."""
    with server.client() as client:
        images = client.get("/v1/images").json()
        default = next(i for i in images if i["name"] == default_image.name)
        assert default["default"] is True
        assert default["size_bytes"] > 0
        health = client.get("/healthz").json()
        assert (health["status"], health["sandboxes"]) == ("ok", 0)
        assert client.get("/docs").status_code == 200
        spec = client.get("/openapi.json").json()
        assert {"/v1/sandboxes", "/vm/create", "/exec/command", "/healthz"} <= set(spec["paths"])
        json.dumps(spec)


# --- crash recovery ----------------------------------------------------------------------


def test_sigkill_mid_exec_then_restart_reconciles(data_dir: Path, default_image: ImageInfo) -> None:
    """After SIGKILL of the server mid-exec, a restart re-attaches live VMs, marks dead ones."""
    with serve_emberbox(data_dir) as first, first.client() as client:
        alive = client.post("/v1/sandboxes", json={}).json()
        doomed = client.post("/v1/sandboxes", json={}).json()
        in_flight = subprocess.Popen(
            ["curl", "-s", "-X", "POST", f"{first.url}/v1/sandboxes/{alive['id']}/exec",
             "-H", "content-type: application/json", "-d", '{"cmd": "sleep 5; echo late"}'],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(1)
        first.process.kill()
        first.process.wait()
        in_flight.wait(30)
        # While no server runs, one VMM dies: the restart must notice.
        doomed_pids = pids_mentioning(f"emberbox-{doomed['id']}")
        assert doomed_pids
        for pid in doomed_pids:
            os.kill(pid, signal.SIGKILL)
    # (The first server's warm-pool VM, if it had one, is an orphan for the second one.)
    with serve_emberbox(data_dir, EMBERBOX_POOL_SIZE="0") as second, second.client() as client:
        listing = {s["id"]: s for s in client.get("/v1/sandboxes").json()["sandboxes"]}
        assert listing[alive["id"]]["state"] == "running"
        assert listing[doomed["id"]]["state"] == "error"
        assert listing[doomed["id"]]["error"]
        again = client.post(f"/v1/sandboxes/{alive['id']}/exec", json={"cmd": "echo again"})
        assert again.json()["stdout"] == "again\n"
        assert not (data_dir / "vms" / doomed["id"]).exists()
        assert len(qemu_pids_under(data_dir)) == 1
