"""Contract tests: every request the Firecracker driver sends must be valid for the real API.

The driver runs its full lifecycle against a fake ``firecracker`` (a Python script serving
the API on a real unix socket and a vsock-like socket), which records each request. Every
recorded request is then checked against Firecracker's Swagger file from ``../shared``:
the (method, path) must exist and the body must validate against its definition, with
required fields enforced and ``additionalProperties: false`` added so that a field the
spec does not define fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft4Validator

from emberbox.errors import SnapshotCorrupt, VMMCrashed, VMMError
from emberbox.vmm.base import BootFiles, SnapshotFiles, VMConfig
from emberbox.vmm.firecracker import api as fc_api
from emberbox.vmm.firecracker.driver import FirecrackerDriver
from emberbox.vmm.firecracker.jailer import JailerConfig

SPEC_DIR = Path(__file__).parents[2].parent / "shared" / "firecracker"
SPECS = sorted(SPEC_DIR.glob("firecracker-api-v*.yaml"))
needs_spec = pytest.mark.skipif(
    not SPECS,
    reason=f"Firecracker API spec not found (expected {SPEC_DIR}/firecracker-api-v*.yaml)",
)

# --- the fake firecracker --------------------------------------------------------------

FAKE_FIRECRACKER = r"""
import json, os, socket, sys, threading
from http.server import BaseHTTPRequestHandler
from socketserver import ThreadingUnixStreamServer

RECORD = __RECORD__
MODE = __MODE__
ROOT = os.environ.get("FAKE_FC_ROOT")  # set by the fake jailer: "/" means this dir

args = sys.argv[1:]
if args == ["--version"]:
    print("Firecracker v1.16.1\n\nSupported snapshot data format versions: 8.0.0")
    sys.exit(0)
if MODE == "crash":
    print("fake firecracker: cannot open /dev/kvm", file=sys.stderr)
    sys.exit(1)
print("fake serial: firecracker starting", flush=True)


def host(path):
    return os.path.join(ROOT, path.lstrip("/")) if ROOT and os.path.isabs(path) else path


class Fault(Exception):
    pass


state = {"configured": set(), "running": False, "paused": False, "drive": None, "vsock": None}


def serve_vsock(uds):
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(host(uds))
    srv.listen()
    refusals = 2  # the guest agent is "not listening yet" for the first connections

    def talk(conn):
        with conn:
            line = b""
            while not line.endswith(b"\n"):
                data = conn.recv(1)
                if not data:
                    return
                line += data
            if line != b"CONNECT 1024\n":
                return
            conn.sendall(b"OK 1073741824\nEB-first-agent-bytes")  # agent bytes ride along
            while data := conn.recv(4096):
                conn.sendall(data)

    while True:
        conn, _ = srv.accept()
        if refusals > 0:
            refusals -= 1
            conn.close()
            continue
        threading.Thread(target=talk, args=(conn,), daemon=True).start()


def start_vsock(uds):
    threading.Thread(target=serve_vsock, args=(uds,), daemon=True).start()


def require_file(path):
    if not os.path.isfile(host(path)):
        raise Fault(f"No such file: {path}")


def route(method, path, body):
    pre_boot = path not in ("/vm", "/snapshot/create", "/") and method == "PUT"
    if pre_boot and state["running"]:
        raise Fault(f"The requested operation is not supported after starting the microVM.")
    if path in ("/logger", "/metrics"):
        require_file(body.get("log_path") or body.get("metrics_path"))
    elif path == "/machine-config":
        if body["mem_size_mib"] < 16:
            raise Fault("Invalid memory size: the guest needs at least 16 MiB")
    elif path == "/boot-source":
        require_file(body["kernel_image_path"])
        require_file(body["initrd_path"])
    elif path.startswith("/drives/"):
        require_file(body["path_on_host"])
        state["drive"] = body["path_on_host"]
    elif path == "/vsock":
        state["vsock"] = body["uds_path"]
    elif path == "/actions":
        if not {"/machine-config", "/boot-source"} <= state["configured"]:
            raise Fault("Cannot start microvm without kernel configuration.")
        start_vsock(state["vsock"])
        state["running"] = True
        print("fake serial: guest booted", flush=True)
    elif path == "/vm":
        if not state["running"]:
            raise Fault("The microVM is not running.")
        state["paused"] = body["state"] == "Paused"
    elif path == "/snapshot/create":
        if not state["paused"]:
            raise Fault("Cannot create snapshot: the microVM is not paused.")
        if MODE == "snapshot-fails":
            raise Fault("Create snapshot error: No space left on device (os error 28)")
        with open(host(body["snapshot_path"]), "w") as f:
            json.dump({"drive": state["drive"], "vsock": state["vsock"]}, f)
        with open(host(body["mem_file_path"]), "wb") as f:
            f.write(b"guest memory")
    elif path == "/snapshot/load":
        if state["configured"] - {"/logger", "/metrics"}:
            raise Fault("Loading a snapshot not allowed after configuring boot resources.")
        if MODE == "die-on-load":
            print("fake firecracker: bad snapshot state, aborting", file=sys.stderr, flush=True)
            os._exit(134)
        try:
            with open(host(body["snapshot_path"])) as f:
                saved = json.load(f)
        except (OSError, ValueError) as exc:
            raise Fault(f"Load snapshot error: Failed to restore from snapshot: {exc}")
        require_file(body["mem_backend"]["backend_path"])
        require_file(saved["drive"])  # like Firecracker: the recorded drive path is reopened
        state.update(drive=saved["drive"], vsock=saved["vsock"], running=True)
        state["paused"] = not body.get("resume_vm", False)
        start_vsock(saved["vsock"])
    elif path == "/":
        return {"app_name": "Firecracker", "id": "anonymous-instance",
                "state": "Running" if state["running"] else "Not started", "vmm_version": "1.16.1"}
    state["configured"].add(path if not path.startswith("/drives/") else "/drives")
    return None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def handle_any(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        with open(RECORD, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "method": self.command,
                                "path": self.path, "body": body}) + "\n")
        try:
            code, answer = 200, route(self.command, self.path, body)
            if answer is None:
                code = 204
        except Fault as exc:
            code, answer = 400, {"fault_message": str(exc)}
        data = json.dumps(answer).encode() if answer is not None else b""
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        if data:
            self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = do_PATCH = handle_any


server = ThreadingUnixStreamServer(host(args[args.index("--api-sock") + 1]), Handler)
server.daemon_threads = True
server.serve_forever()
"""

FAKE_JAILER = r"""
import os, sys

args = sys.argv[1:]
split = args.index("--")
opts, rest = args[:split], args[split + 1:]
def opt(name):
    return opts[opts.index(name) + 1]
exec_file = opt("--exec-file")
exec_name = os.path.basename(exec_file)
root = os.path.join(opt("--chroot-base-dir"), exec_name, opt("--id"), "root")
os.makedirs(root, exist_ok=True)
os.chdir(root)  # the real jailer pivots into root; the fake maps "/" there instead
os.environ["FAKE_FC_ROOT"] = root
argv = [exec_file, "--id=" + opt("--id"), "--start-time-us=0", *rest]
if "--new-pid-ns" not in opts:
    os.execv(exec_file, argv)
pid = os.fork()
if pid == 0:
    os.execv(exec_file, argv)
with open(os.path.join(root, exec_name + ".pid"), "w") as f:
    f.write(str(pid))
"""


def _script(path: Path, source: str) -> Path:
    path.write_text(f"#!{sys.executable}\n{source}")
    path.chmod(0o755)
    return path


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temporary directory: unix socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="fc", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def record(short_tmp: Path) -> Path:
    return short_tmp / "requests.jsonl"


def _fake_binary(short_tmp: Path, record: Path, mode: str = "ok") -> Path:
    bin_dir = short_tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    source = FAKE_FIRECRACKER.replace("__RECORD__", repr(str(record)))
    return _script(bin_dir / "firecracker", source.replace("__MODE__", repr(mode)))


@pytest.fixture
def guest(short_tmp: Path) -> BootFiles:
    images = short_tmp / "img"
    images.mkdir()
    for name in ("vmlinux", "bzImage", "initrd"):
        (images / name).write_bytes(name.encode())
    (images / "rootfs.ext4").write_bytes(b"ext4" + bytes(200_000) + b"superblock")
    return BootFiles(
        kernel=images / "bzImage",
        vmlinux=images / "vmlinux",
        initrd=images / "initrd",
        rootfs=images / "rootfs.ext4",
    )


def _config(short_tmp: Path, guest: BootFiles, vm_id: str, **kw: Any) -> VMConfig:
    return VMConfig(vm_id=vm_id, work_dir=short_tmp / "vms" / vm_id, guest=guest, **kw)


def _requests(record: Path) -> list[dict[str, Any]]:
    """What the fake Firecrackers were asked, in order (none: no process ever served)."""
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text().splitlines()]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def _handmade_snapshot(short_tmp: Path, vmstate: bytes) -> SnapshotFiles:
    """A snapshot directory as the driver writes it, ``vmstate`` as given."""
    directory = short_tmp / "snaps" / "handmade"
    directory.mkdir(parents=True)
    (directory / "vmstate").write_bytes(vmstate)
    (directory / "memory").write_bytes(b"guest memory")
    (directory / "rootfs.ext4").write_bytes(b"ext4 disk")
    return SnapshotFiles(directory, "firecracker", "1.16.1")


_GOOD_VMSTATE = json.dumps({"drive": "rootfs.ext4", "vsock": "vsock.sock"}).encode()


# --- the spec validator ----------------------------------------------------------------


def _strict(schema: Any) -> Any:
    """The schema with ``additionalProperties: false`` on every object that lists its fields."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _strict(value) for key, value in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


class SpecValidator:
    """Checks (method, path, body) against a Swagger 2.0 document."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.definitions = _strict(spec["definitions"])
        self.paths: dict[str, dict[str, Any]] = spec["paths"]

    def _match(self, path: str) -> tuple[str, dict[str, str]] | None:
        for template in self.paths:
            pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template))
            found = re.fullmatch(pattern, path)
            if found:
                return template, found.groupdict()
        return None

    def errors(self, method: str, path: str, body: Any) -> list[str]:
        matched = self._match(path)
        if matched is None:
            return [f"{path}: no such path in the spec"]
        template, params = matched
        operation = self.paths[template].get(method.lower())
        if operation is None:
            return [f"{method} {template}: method not in the spec"]
        body_params = [p for p in operation.get("parameters", []) if p["in"] == "body"]
        if not body_params:
            return [] if body is None else [f"{method} {template}: takes no body"]
        if body is None:
            return [f"{method} {template}: body required"] if body_params[0].get("required") else []
        schema = {"definitions": self.definitions, **body_params[0]["schema"]}
        found = [
            f"{method} {path} {'/'.join(map(str, e.absolute_path)) or '<body>'}: {e.message}"
            for e in Draft4Validator(schema).iter_errors(body)
        ]
        # Firecracker also insists that ids in the path and in the body agree.
        for name, value in params.items():
            if isinstance(body, dict) and name in body and body[name] != value:
                found.append(f"{method} {path}: {name} {body[name]!r} differs from the path")
        return found


@pytest.fixture(scope="module")
def validator() -> SpecValidator:
    if not SPECS:
        pytest.skip(f"Firecracker API spec not found (expected {SPEC_DIR}/firecracker-api-v*.yaml)")
    return SpecValidator(yaml.safe_load(SPECS[-1].read_text()))


def _assert_valid(validator: SpecValidator, requests: list[dict[str, Any]]) -> None:
    problems = [e for r in requests for e in validator.errors(r["method"], r["path"], r["body"])]
    assert not problems, "\n".join(problems)


@needs_spec
def test_validator_rejects_what_firecracker_would_reject(validator: SpecValidator) -> None:
    """The validator itself catches unknown fields, missing fields, bad enums and bad paths."""
    ok = {"vcpu_count": 2, "mem_size_mib": 512}
    assert validator.errors("PUT", "/machine-config", ok) == []
    assert validator.errors("PUT", "/machine-config", {**ok, "memory_mib": 512})  # unknown
    assert validator.errors("PUT", "/machine-config", {"vcpu_count": 2})  # required missing
    assert validator.errors("PUT", "/machine-config", {**ok, "vcpu_count": "2"})  # type
    assert validator.errors("PATCH", "/vm", {"state": "Stopped"})  # enum
    assert validator.errors(
        "PUT",
        "/snapshot/load",
        {
            "snapshot_path": "s",
            "mem_backend": {"backend_type": "File", "backend_path": "m", "extra": 1},
        },
    )  # unknown, nested via $ref
    assert validator.errors(
        "PUT", "/drives/rootfs", {**fc_api.root_drive_payload("x"), "drive_id": "other"}
    )  # path mismatch
    assert validator.errors("PUT", "/no-such-path", {})
    assert validator.errors("DELETE", "/vm", None)


@needs_spec
def test_pure_request_plans_match_the_spec(validator: SpecValidator) -> None:
    """Boot, restore, pause/resume and snapshot payloads validate without any process."""
    plan = fc_api.BootPlan(1, 256, "/k", "/i", "rootfs.ext4", "vsock.sock", "l", "m", ("quiet",))
    requests = [
        *fc_api.boot_requests(plan),
        *fc_api.restore_requests("l", "m", "snap/vmstate", "snap/memory"),
        fc_api.ApiRequest("PATCH", "/vm", fc_api.vm_state_payload("Paused")),
        fc_api.ApiRequest("PUT", "/snapshot/create", fc_api.snapshot_create_payload("a", "b")),
    ]
    _assert_valid(
        validator, [{"method": r.method, "path": r.path, "body": r.body} for r in requests]
    )


# --- the lifecycle against the fake ----------------------------------------------------


@needs_spec
@pytest.mark.anyio
async def test_full_lifecycle_speaks_the_spec(
    short_tmp: Path, record: Path, guest: BootFiles, validator: SpecValidator
) -> None:
    """Boot, pause, snapshot, resume, kill, restore elsewhere, agent stream: all spec-valid."""
    driver = FirecrackerDriver(str(_fake_binary(short_tmp, record)))
    rootfs_digest = _digest(guest.rootfs)
    source = _config(short_tmp, guest, "vm1", vcpus=2, memory_mib=256, kernel_args=("quiet",))
    vm = await driver.start(source)
    try:
        assert vm.is_running() and (source.work_dir / "rootfs.ext4").exists()
        assert oct(source.work_dir.stat().st_mode & 0o777) == "0o700"
        await vm.pause()
        await vm.resume()
        snap = await vm.snapshot(short_tmp / "snaps" / "s1")
        assert snap.vmm == "firecracker" and snap.vmm_version == "1.16.1"
        assert {p.name for p in snap.directory.iterdir()} == {"vmstate", "memory", "rootfs.ext4"}
        assert "guest booted" in vm.console_tail()
    finally:
        await vm.kill()
    assert not source.work_dir.exists()  # the restore below cannot lean on the old disk

    target = _config(short_tmp, guest, "vm2")
    restored = await driver.restore(target, snap)
    try:
        reader, writer = await restored.open_agent_stream(timeout_s=10)
        assert await reader.readexactly(20) == b"EB-first-agent-bytes"
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        writer.close()
        await writer.wait_closed()
    finally:
        await restored.kill()

    requests = _requests(record)
    _assert_valid(validator, requests)
    calls = [(r["method"], r["path"]) for r in requests]
    assert calls == [
        ("PUT", "/logger"),
        ("PUT", "/metrics"),
        ("PUT", "/machine-config"),
        ("PUT", "/boot-source"),
        ("PUT", "/drives/rootfs"),
        ("PUT", "/vsock"),
        ("PUT", "/entropy"),
        ("PUT", "/actions"),
        ("PATCH", "/vm"),
        ("PATCH", "/vm"),
        ("PATCH", "/vm"),
        ("PUT", "/snapshot/create"),
        ("PATCH", "/vm"),
        ("PUT", "/logger"),
        ("PUT", "/metrics"),
        ("PUT", "/snapshot/load"),
    ]
    bodies = {r["path"]: r["body"] for r in requests}
    assert bodies["/machine-config"] == {"vcpu_count": 2, "mem_size_mib": 256}
    assert bodies["/boot-source"]["boot_args"].endswith("emberbox.transport=vsock quiet")
    assert bodies["/drives/rootfs"]["path_on_host"] == "rootfs.ext4"  # relative: see module doc
    assert bodies["/snapshot/load"]["mem_backend"]["backend_type"] == "File"
    assert _digest(guest.rootfs) == rootfs_digest


@pytest.mark.anyio
async def test_attach_readopts_a_running_firecracker(
    short_tmp: Path, record: Path, guest: BootFiles
) -> None:
    """A second driver (a restarted server) re-adopts the process by pid and can kill it."""
    binary = str(_fake_binary(short_tmp, record))
    config = _config(short_tmp, guest, "vm1", lifetime="detached")
    first = await FirecrackerDriver(binary).start(config)
    try:
        assert first.pid is not None
        adopted = await FirecrackerDriver(binary).attach(config, first.pid)
        await adopted.pause()
        await adopted.kill()
        assert not adopted.is_running() and not config.work_dir.exists()
        await adopted.kill()  # idempotent
    finally:
        await first.kill()  # reaps our child; nothing left to remove
    assert _requests(record)[-1]["body"] == {"state": "Paused"}


@pytest.mark.anyio
async def test_attach_refuses_a_process_that_is_not_this_vm(
    short_tmp: Path, record: Path, guest: BootFiles
) -> None:
    """A pid that belongs to another program (pid reuse) is not adopted."""
    binary = str(_fake_binary(short_tmp, record))
    config = _config(short_tmp, guest, "vm1")
    with pytest.raises(VMMCrashed, match="not the Firecracker"):
        await FirecrackerDriver(binary).attach(config, os.getpid())


@pytest.mark.anyio
async def test_api_fault_becomes_vmm_error_and_cleans_up(
    short_tmp: Path, record: Path, guest: BootFiles
) -> None:
    """A 400 with fault_message surfaces as VMMError; the process and work dir are gone."""
    driver = FirecrackerDriver(str(_fake_binary(short_tmp, record)))
    config = _config(short_tmp, guest, "vm1", memory_mib=8)
    with pytest.raises(VMMError, match="Invalid memory size") as caught:
        await driver.start(config)
    assert "PUT /machine-config (HTTP 400)" in caught.value.message
    assert "firecracker starting" in caught.value.console_tail
    assert not config.work_dir.exists()


@pytest.mark.anyio
async def test_process_dying_before_its_socket_is_a_crash(
    short_tmp: Path, record: Path, guest: BootFiles
) -> None:
    """Firecracker exiting at start raises VMMCrashed carrying its stderr."""
    driver = FirecrackerDriver(str(_fake_binary(short_tmp, record, mode="crash")))
    with pytest.raises(VMMCrashed, match="exited") as caught:
        await driver.start(_config(short_tmp, guest, "vm1"))
    assert "cannot open /dev/kvm" in caught.value.console_tail


@needs_spec
@pytest.mark.anyio
async def test_jailer_mode_lifecycle(
    short_tmp: Path, record: Path, guest: BootFiles, validator: SpecValidator
) -> None:
    """Under a (fake) jailer: files placed in the jail, jail-relative paths, jail removed."""
    jail = JailerConfig(
        exec_file=_fake_binary(short_tmp, record),
        uid=os.getuid(),
        gid=os.getgid(),
        jailer_binary=str(_script(short_tmp / "bin" / "jailer", FAKE_JAILER)),
        chroot_base_dir=short_tmp / "j",
        cgroup_root=short_tmp / "cg",
    )
    driver = FirecrackerDriver(jailer=jail)
    root = short_tmp / "j" / "firecracker" / "vm1" / "root"
    vm = await driver.start(_config(short_tmp, guest, "vm1"))
    try:
        assert vm.pid == int((root / "firecracker.pid").read_text())
        assert {"vmlinux", "initrd", "rootfs.ext4"} <= {p.name for p in root.iterdir()}
        snap = await vm.snapshot(short_tmp / "snaps" / "s1")
    finally:
        await vm.kill()
    assert not (short_tmp / "j" / "firecracker" / "vm1").exists()

    restored = await driver.restore(_config(short_tmp, guest, "vm2"), snap)
    try:
        reader, writer = await restored.open_agent_stream(timeout_s=10)
        assert await reader.readexactly(2) == b"EB"
        writer.close()
        await writer.wait_closed()
    finally:
        await restored.kill()

    requests = _requests(record)
    _assert_valid(validator, requests)
    bodies = {r["path"]: r["body"] for r in requests}
    assert bodies["/boot-source"]["kernel_image_path"] == "vmlinux"
    assert bodies["/snapshot/create"]["snapshot_path"] == "snapshot/vmstate"
    assert bodies["/snapshot/load"]["snapshot_path"] == "vmstate"


@pytest.mark.anyio
async def test_snapshot_of_a_paused_vm_leaves_it_paused(
    short_tmp: Path, record: Path, guest: BootFiles
) -> None:
    """snapshot() only resumes a VM it paused itself; wait() then reports the SIGKILL."""
    vm = await FirecrackerDriver(str(_fake_binary(short_tmp, record))).start(
        _config(short_tmp, guest, "vm1")
    )
    try:
        await vm.pause()
        await vm.snapshot(short_tmp / "snap")
    finally:
        await vm.kill()
    assert await vm.wait() == -9
    states = [r["body"]["state"] for r in _requests(record) if r["path"] == "/vm"]
    assert states == ["Paused"]


# --- snapshot errors and stop ----------------------------------------------------------


@needs_spec
@pytest.mark.anyio
async def test_refused_snapshot_load_is_corrupt_and_cleans_up(
    short_tmp: Path, record: Path, guest: BootFiles, validator: SpecValidator
) -> None:
    """A load refused with a 400 fault is SnapshotCorrupt naming vmstate; the VM is gone."""
    snap = _handmade_snapshot(short_tmp, b"\x00truncated")
    state = snap.directory.absolute() / "vmstate"
    config = _config(short_tmp, guest, "vm1")
    with pytest.raises(SnapshotCorrupt) as caught:
        await FirecrackerDriver(str(_fake_binary(short_tmp, record))).restore(config, snap)
    err = caught.value
    assert err.message.startswith(f"could not load snapshot {state}: Load snapshot error: ")
    assert err.details["file"] == str(state)
    assert "firecracker starting" in err.console_tail
    requests = _requests(record)
    _assert_valid(validator, requests)
    assert requests[-1]["path"] == "/snapshot/load"
    assert not _alive(requests[-1]["pid"]) and not config.work_dir.exists()
    assert state.read_bytes() == b"\x00truncated"  # the snapshot is left for the caller


@pytest.mark.anyio
async def test_vmm_dying_during_load_is_corrupt_and_cleans_up(
    short_tmp: Path, record: Path, guest: BootFiles
) -> None:
    """A Firecracker that exits while loading is SnapshotCorrupt with its exit and stderr."""
    snap = _handmade_snapshot(short_tmp, _GOOD_VMSTATE)
    driver = FirecrackerDriver(str(_fake_binary(short_tmp, record, mode="die-on-load")))
    config = _config(short_tmp, guest, "vm1")
    with pytest.raises(SnapshotCorrupt, match=r"Firecracker exited \(status 134\)") as caught:
        await driver.restore(config, snap)
    state = snap.directory.absolute() / "vmstate"
    assert caught.value.message.startswith(f"could not load snapshot {state}: ")
    assert caught.value.details["file"] == str(state)
    assert "bad snapshot state, aborting" in caught.value.console_tail
    assert not _alive(_requests(record)[-1]["pid"]) and not config.work_dir.exists()


@pytest.mark.anyio
async def test_restore_of_a_snapshot_missing_a_file_starts_nothing(
    short_tmp: Path, record: Path, guest: BootFiles
) -> None:
    """A missing ``memory`` is SnapshotCorrupt naming it, before any process or file exists."""
    snap = _handmade_snapshot(short_tmp, _GOOD_VMSTATE)
    (snap.directory / "memory").unlink()
    config = _config(short_tmp, guest, "vm1")
    with pytest.raises(SnapshotCorrupt, match="is missing") as caught:
        await FirecrackerDriver(str(_fake_binary(short_tmp, record))).restore(config, snap)
    assert caught.value.details["file"] == str(snap.directory.absolute() / "memory")
    assert _requests(record) == [] and not config.work_dir.exists()


@pytest.mark.anyio
async def test_snapshot_with_stop_ends_the_vmm_and_keeps_dest(
    short_tmp: Path, record: Path, guest: BootFiles
) -> None:
    """snapshot(stop=True) kills the VMM, removes its work dir and leaves a loadable dest."""
    driver = FirecrackerDriver(str(_fake_binary(short_tmp, record)))
    config = _config(short_tmp, guest, "vm1")
    vm = await driver.start(config)
    try:
        pid = vm.pid
        assert pid is not None
        snap = await vm.snapshot(short_tmp / "snaps" / "paused", stop=True)
        assert not vm.is_running() and not _alive(pid) and not config.work_dir.exists()
    finally:
        await vm.kill()  # idempotent: nothing left to do
    assert {p.name for p in snap.directory.iterdir()} == {"vmstate", "memory", "rootfs.ext4"}
    assert _digest(snap.directory / "rootfs.ext4") == _digest(guest.rootfs)
    states = [r["body"]["state"] for r in _requests(record) if r["path"] == "/vm"]
    assert states == ["Paused"]  # never resumed: the guest ran no further than the snapshot

    restored = await driver.restore(_config(short_tmp, guest, "vm2"), snap)
    await restored.kill()


@pytest.mark.anyio
async def test_failed_snapshot_with_stop_keeps_the_vm_running(
    short_tmp: Path, record: Path, guest: BootFiles
) -> None:
    """When the save fails, stop or not, dest is removed and the guest runs on."""
    driver = FirecrackerDriver(str(_fake_binary(short_tmp, record, mode="snapshot-fails")))
    vm = await driver.start(_config(short_tmp, guest, "vm1"))
    try:
        with pytest.raises(VMMError, match="No space left on device"):
            await vm.snapshot(short_tmp / "snaps" / "s1", stop=True)
        assert vm.is_running() and not (short_tmp / "snaps" / "s1").exists()
    finally:
        await vm.kill()
    states = [r["body"]["state"] for r in _requests(record) if r["path"] == "/vm"]
    assert states == ["Paused", "Resumed"]


@pytest.mark.anyio
async def test_restore_with_adopt_disk_copies_and_leaves_the_snapshot(
    short_tmp: Path, record: Path, guest: BootFiles
) -> None:
    """adopt_disk is safe to ignore: the VM gets its own disk, the snapshot stays whole."""
    snap = _handmade_snapshot(short_tmp, _GOOD_VMSTATE)
    before = {p.name: _digest(p) for p in snap.directory.iterdir()}
    config = _config(short_tmp, guest, "vm1")
    vm = await FirecrackerDriver(str(_fake_binary(short_tmp, record))).restore(
        config, snap, adopt_disk=True
    )
    try:
        disk = config.work_dir / "rootfs.ext4"
        assert disk.stat().st_nlink == 1  # a copy, not a link to the snapshot's disk
        assert {p.name: _digest(p) for p in snap.directory.iterdir()} == before
        shutil.rmtree(snap.directory)  # what a caller that adopted the disk may do next
        reader, writer = await vm.open_agent_stream(timeout_s=10)
        assert await reader.readexactly(2) == b"EB"
        writer.close()
        await writer.wait_closed()
    finally:
        await vm.kill()
    assert not config.work_dir.exists()
