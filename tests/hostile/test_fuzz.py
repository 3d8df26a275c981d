"""Schemathesis against a live ``emberbox serve`` over real VMs: every operation of the
server's own ``/openapi.json``, with a valid key, a bounded number of examples each.

It proves: no input gets a 5xx (nor an ``internal error`` event inside a 200 stream); every
response, error responses included, has a documented status code and matches the documented
schema (each NDJSON line too); the server logs no traceback; afterwards it still creates a
sandbox and runs a command in it, and nothing the fuzzer made is left running.

Three generated values in four are swapped for live ones (a running sandbox, a background
process in it, a snapshot, a language, a guest path worth trying, a real tar), so the
fuzzer gets past the 404s into the service and the guest; the rest stay as generated.
Operations that boot or save VMs get fewer examples. ``EMBERBOX_FUZZ_SEED`` and
``EMBERBOX_FUZZ_EXAMPLES`` change the (fixed, so CI is repeatable) seed and budget; the
calls made, by operation and status, are printed at the end (``-s``).
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import subprocess
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import jsonschema
import pytest
import schemathesis
from schemathesis import Case, CheckContext, Response
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from emberbox.api.app import create_app
from emberbox.config import Settings
from emberbox.images.registry import ImageInfo
from tests.support.paths import qemu_pids_under, short_tmp_dir
from tests.support.servers import Server, serve_emberbox

pytestmark = [pytest.mark.vm]

KEY = f"fuzz-{secrets.token_hex(16)}"
AUTH = {"Authorization": f"Bearer {KEY}"}
SEED = int(os.environ.get("EMBERBOX_FUZZ_SEED", "20261126"))
EXAMPLES = int(os.environ.get("EMBERBOX_FUZZ_EXAMPLES", "30"))
REQUEST_TIMEOUT_S = 120.0
NDJSON = "application/x-ndjson"

# Operations that boot, fork, save or restore a VM (~0.3-5 s each under TCG): few examples,
# and no positive coverage cases (the coverage phase is not bounded by max-examples).
HEAVY = {
    "POST /v1/sandboxes": 6,
    "POST /vm/create": 4,
    "POST /v1/run": 4,
    "POST /v1/sandboxes/{sandbox_id}/snapshots": 3,
    "POST /v1/sandboxes/{sandbox_id}/pause": 3,
    "POST /v1/sandboxes/{sandbox_id}/resume": 3,
}

# Small limits so that fuzzed sizes are refused (4xx) instead of taking the host's memory,
# and fuzzed commands that never end are cut short; no rate limit in the way of the fuzzer.
SERVER_ENV = {
    "EMBERBOX_API_KEY": KEY,
    "EMBERBOX_POOL_SIZE": "1",
    "EMBERBOX_MAX_SANDBOXES": "8",
    "EMBERBOX_MAX_VCPUS": "2",
    "EMBERBOX_MAX_MEMORY_MIB": "1024",
    "EMBERBOX_DEFAULT_EXEC_TIMEOUT_S": "10",
    "EMBERBOX_MAX_EXEC_TIMEOUT_S": "10",
    "EMBERBOX_RUN_MAX_TIMEOUT_S": "5",
    "EMBERBOX_RUN_COMPILE_TIMEOUT_S": "30",
    "EMBERBOX_MAX_UPLOAD_BYTES": "65536",
    "EMBERBOX_RATE_LIMIT_PER_S": "100000",
    "EMBERBOX_RATE_LIMIT_BURST": "100000",
}

LANGUAGES = ["python3", "bash", "node", "c", "c++"]
# Guest paths worth more than random text: dirs, files, devices, /proc, symlinks, "..".
GUEST_PATHS = [
    "/tmp",
    "tmp/fuzz",
    "/etc/hostname",
    "/etc/../etc/passwd",
    "/dev/null",
    "/dev/zero",
    "/proc/self/status",
    "/proc/self/mem",
    "/proc/self/fd",
    "/etc/alternatives",
    "/root",
]


def _sample_tar() -> bytes:
    """A small archive with a file, a directory, a symlink and a hard link."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, target in [
            ("dir", tarfile.DIRTYPE, ""),
            ("dir/file.txt", tarfile.REGTYPE, ""),
            ("dir/link", tarfile.SYMTYPE, "file.txt"),
            ("dir/hard", tarfile.LNKTYPE, "dir/file.txt"),
        ]:
            member = tarfile.TarInfo(name)
            member.type, member.linkname, member.mode = kind, target, 0o755
            data = b"fuzz\n" if kind == tarfile.REGTYPE else b""
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return out.getvalue()


SAMPLE_TAR = _sample_tar()

schemathesis.serializer.alias("application/x-tar", "application/octet-stream")


def fuzz_config() -> schemathesis.Config:
    heavy = [
        {
            "include-name": label,
            "generation": {"max-examples": count},
            "phases": {"coverage": {"generation": {"mode": "negative"}}},
        }
        for label, count in HEAVY.items()
    ]
    return schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "headers": AUTH,
            "request-timeout": REQUEST_TIMEOUT_S,
            "generation": {"max-examples": EXAMPLES, "database": "none"},
            "phases": {"examples": {"enabled": False}, "stateful": {"enabled": False}},
            "suppress-health-check": ["too_slow", "filter_too_much", "data_too_large"],
            "operations": heavy,
        }
    )


@pytest.fixture(scope="module")
def fuzz_server(default_image: ImageInfo, polyglot_image: ImageInfo) -> Iterator[Server]:
    """One real server with a key; stopped by us (its helper's clean-up knows no key)."""
    data_dir = short_tmp_dir("eb-fuzz-")
    try:
        with serve_emberbox(data_dir, **SERVER_ENV) as running:
            try:
                yield running
            finally:
                with _client(running) as client:
                    _remove_everything(client)
                running.process.terminate()
                running.process.wait(30)
    finally:
        leftovers = qemu_pids_under(data_dir)
        for pid in leftovers:
            subprocess.run(["kill", "-9", str(pid)], check=False)
        shutil.rmtree(data_dir, ignore_errors=True)
        assert not leftovers, f"the fuzzer's sandboxes were left running: {leftovers}"


def _client(server: Server) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers=AUTH, timeout=REQUEST_TIMEOUT_S)


def _remove_everything(client: httpx.Client) -> None:
    for sandbox in client.get("/v1/sandboxes").json()["sandboxes"]:
        if sandbox["state"] != "stopped":
            client.delete(f"/v1/sandboxes/{sandbox['id']}")
    for snapshot in client.get("/v1/snapshots").json()["snapshots"]:
        client.delete(f"/v1/snapshots/{snapshot['id']}")


@dataclass
class Targets:
    """Live objects that generated values are swapped for; re-made when the fuzzer breaks
    them (and a fresh sandbox for each operation: one may have wiped its guest's files)."""

    client: httpx.Client
    operation: str = ""
    sandbox_id: str = ""
    pid: int = 0  # a background process on a terminal that runs (sleep)
    ended_pid: int = 0  # one that ended, with output: following it answers at once
    snapshot_id: str = ""
    calls: Counter[tuple[str, int]] = field(default_factory=Counter)  # (operation, status)

    def aim(self, case: Case) -> None:
        path, query = case.path_parameters or {}, case.query or {}
        body = case.body if isinstance(case.body, dict) else {}
        if case.operation.label != self.operation:
            self.operation = case.operation.label
            if "sandbox_id" in path:
                self._fresh_sandbox()
        if _swap(path, "sandbox_id"):
            resume = case.operation.path.endswith("/resume")
            path["sandbox_id"] = self._paused_sandbox() if resume else self._running_sandbox()
        if _swap(path, "pid"):
            path["pid"] = self.ended_pid if _follows(case) else self._running_process()
        if _swap(body, "vm_id"):
            body["vm_id"] = self._running_sandbox()
        for params in (path, body):
            if _swap(params, "snapshot_id"):
                params["snapshot_id"] = self._snapshot()
        if _swap(body, "language"):
            body["language"] = _pick(LANGUAGES, body["language"])
        for params in (query, body):
            if _swap(params, "path") and case.operation.path != "/vm/create":
                params["path"] = _pick(GUEST_PATHS, params["path"])
        upload = case.operation.label == "PUT /v1/sandboxes/{sandbox_id}/archive"
        if upload and _swap({"body": case.body}, "body"):
            case.body = SAMPLE_TAR  # random bytes are rarely a tar: extract a real one

    def clean_up(self, case: Case, response: Response) -> None:
        """Remove what the call made: sandboxes and snapshots (a run removes its own)."""
        label, status = case.operation.label, response.status_code
        self.calls[label, status] += 1
        assert status != 401, "the fuzzer's requests must carry the key"
        if label == "POST /v1/sandboxes" and status == 201:
            self._kill(response.json()["id"])
        elif label == "POST /vm/create" and status == 200:
            self._kill(response.json()["vm_id"])
        elif label == "POST /v1/sandboxes/{sandbox_id}/snapshots" and status == 201:
            assert self.client.delete(f"/v1/snapshots/{response.json()['id']}").status_code == 204

    def _fresh_sandbox(self) -> None:
        if self.sandbox_id:
            self._kill(self.sandbox_id)
        made = self.client.post("/v1/sandboxes", json={"timeout_s": 600})
        assert made.status_code == 201, made.text
        self.sandbox_id = made.json()["id"]
        self.pid = self._start({"cmd": ["sleep", "600"], "pty": {"cols": 80, "rows": 24}})
        self.ended_pid = self._start({"cmd": "echo out; echo err >&2"})

    def _start(self, body: dict[str, Any]) -> int:
        started = self.client.post(f"/v1/sandboxes/{self.sandbox_id}/processes", json=body)
        assert started.status_code == 201, started.text
        pid: int = started.json()["pid"]
        return pid

    def _running_sandbox(self) -> str:
        """The target, replaced if the fuzzer killed, paused or timed it out."""
        state = self.client.get(f"/v1/sandboxes/{self.sandbox_id}").json()["state"]
        if state != "running":
            self._fresh_sandbox()
        else:
            self.client.post(f"/v1/sandboxes/{self.sandbox_id}/timeout", json={"timeout_s": 600})
        return self.sandbox_id

    def _paused_sandbox(self) -> str:
        if self.client.get(f"/v1/sandboxes/{self.sandbox_id}").json()["state"] != "paused":
            paused = self.client.post(f"/v1/sandboxes/{self._running_sandbox()}/pause")
            assert paused.status_code == 200, paused.text
        return self.sandbox_id

    def _running_process(self) -> int:
        """The target's sleep, started again if the fuzzer signalled it to death."""
        status = self.client.get(f"/v1/sandboxes/{self.sandbox_id}/processes/{self.pid}")
        if status.status_code != 200 or not status.json()["running"]:
            self.pid = self._start({"cmd": ["sleep", "600"], "pty": {"cols": 80, "rows": 24}})
        return self.pid

    def _snapshot(self) -> str:
        if self.snapshot_id:
            known = self.client.get(f"/v1/snapshots/{self.snapshot_id}")
            if known.status_code == 200:
                return self.snapshot_id
        source = self.client.post("/v1/sandboxes", json={})
        assert source.status_code == 201, source.text
        taken = self.client.post(f"/v1/sandboxes/{source.json()['id']}/snapshots")
        assert taken.status_code == 201, taken.text
        self._kill(source.json()["id"])
        self.snapshot_id = taken.json()["id"]
        return self.snapshot_id

    def _kill(self, sandbox_id: str) -> None:
        answer = self.client.delete(f"/v1/sandboxes/{sandbox_id}")
        assert answer.status_code in (204, 404), answer.text


def _follows(case: Case) -> bool:
    """Whether the call follows a process's output until it ends (the sleep never does)."""
    query = case.query or {}
    return case.operation.path.endswith("/output") and query.get("follow") not in (False, "false")


def _swap(params: dict[str, Any], name: str) -> bool:
    """Whether to swap a generated value for a live one: three times in four, decided by
    the value (so a run is repeatable); the rest stay as generated (unknown ids, odd text)."""
    return name in params and zlib.crc32(repr(params[name]).encode()) % 4 != 0


def _pick(choices: list[str], generated: object) -> str:
    return choices[zlib.crc32(repr(generated).encode()) % len(choices)]


@pytest.fixture(scope="module")
def targets(fuzz_server: Server) -> Iterator[Targets]:
    with _client(fuzz_server) as client:
        found = Targets(client)
        yield found
    by_operation: dict[str, list[str]] = {}
    for (label, status), count in sorted(found.calls.items()):
        by_operation.setdefault(label, []).append(f"{status}x{count}")
    print(f"--- {found.calls.total()} calls, by operation and status ---")
    for label, counts in by_operation.items():
        print(f"{label}: {' '.join(counts)}")


def stream_events_conform(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """Each line of an NDJSON answer is a documented StreamEvent, and none is an
    internal error (a 500 in disguise: the status line had already gone out)."""
    if not response.headers.get("content-type", [""])[0].startswith(NDJSON):
        return None
    document = case.operation.schema.raw_schema
    content = document["paths"][case.operation.path][case.operation.method]["responses"]["200"]
    schema = {**content["content"][NDJSON]["schema"], "components": document["components"]}
    validator = jsonschema.Draft202012Validator(schema)
    for line in response.content.decode("utf-8").splitlines():
        event: dict[str, Any] = json.loads(line)
        errors = [e.message for e in validator.iter_errors(event)]
        assert not errors, f"stream event {line!r} does not match StreamEvent: {errors}"
        # StreamEvent's error is an object with a type; BuildEvent's names the type.
        error = event.get("error") or {}
        kind = error if isinstance(error, str) else error.get("type")
        assert kind != "EmberboxError", f"internal error in the stream: {line!r}"
    return True


# The port proxy answers 502 when the guest's port does not answer (docs/ports.md): that is
# its documented answer for a port nothing listens on, not a server error.
PROXY_PATHS = ("/v1/sandboxes/{sandbox_id}/ports/{port}/{path}", "/v1/ports/{token}/{path}")


@schemathesis.check
def server_errors_but_a_silent_guest_port(ctx: Any, response: Any, case: Case) -> bool | None:
    """``not_a_server_error``, except a proxied request's 502 (the guest port's silence)."""
    if case.operation.path in PROXY_PATHS and response.status_code == 502:
        return True
    return not_a_server_error(ctx, response, case)


CHECKS = [
    server_errors_but_a_silent_guest_port,
    status_code_conformance,
    response_schema_conformance,
]
# The operations are collected from the app's own document, built here without a server;
# test_the_live_server_documents_the_same_api proves the live server's is the same.
OPENAPI = create_app(Settings()).openapi()
schema = schemathesis.openapi.from_dict(OPENAPI, config=fuzz_config())


@schema.parametrize()
def test_api_fuzz(case: Case, fuzz_server: Server, targets: Targets) -> None:
    """Every operation, fuzzed: no 5xx, documented statuses, schema-conformant answers."""
    targets.aim(case)
    response = case.call(base_url=fuzz_server.url)
    try:
        case.validate_response(response, checks=CHECKS, additional_checks=[stream_events_conform])
    finally:
        targets.clean_up(case, response)


def test_create_at_the_documented_bounds(fuzz_server: Server, targets: Targets) -> None:
    """Each integer of a create at its documented minimum and maximum: booted, or refused
    with a 4xx, never a 5xx (memory_mib 64 once passed and crashed the guest at boot).
    The fuzzer's coverage phase sends only invalid bounds here, to bound the boots."""
    operation = schema["/v1/sandboxes"]["POST"]
    fields = OPENAPI["components"]["schemas"]["SandboxCreate"]["properties"]
    bounds = [(name, value) for name, field in fields.items() for value in _int_bounds(field)]
    assert {"vcpus", "memory_mib", "timeout_s"} <= {name for name, _ in bounds}
    for name, value in bounds:
        case = operation.Case(body={name: value})
        response = case.call(base_url=fuzz_server.url, headers=AUTH)
        try:
            case.validate_response(response, checks=CHECKS)
        finally:
            targets.clean_up(case, response)


def _int_bounds(field: dict[str, Any]) -> list[int]:
    for option in field.get("anyOf", [field]):
        if option.get("type") == "integer":
            return [int(option[key]) for key in ("minimum", "maximum") if key in option]
    return []


def test_the_live_server_documents_the_same_api(fuzz_server: Server) -> None:
    """The document the fuzzer generated from is the live server's /openapi.json."""
    with _client(fuzz_server) as client:
        assert client.get("/openapi.json").json() == OPENAPI


def test_server_is_healthy_after_the_fuzzing(fuzz_server: Server, targets: Targets) -> None:
    """After the fuzzer: no traceback in the log, and a new sandbox still runs commands."""
    log = fuzz_server.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "unhandled" not in log, log[-4000:]
    with _client(fuzz_server) as client:
        made = client.post("/v1/sandboxes", json={})
        assert made.status_code == 201, made.text
        ran = client.post(f"/v1/sandboxes/{made.json()['id']}/exec", json={"cmd": "echo ok"})
        assert ran.json()["stdout"] == "ok\n"
        assert client.delete(f"/v1/sandboxes/{made.json()['id']}").status_code == 204
