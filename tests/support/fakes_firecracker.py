"""A fake ``firecracker`` and ``jailer`` for the Firecracker driver's contract tests
(``tests/unit/firecracker_contract/``), and what those tests read back.

The fake is a Python script serving the API on a real unix socket and a vsock-like
socket; it appends each request it gets (with its pid) to a JSON-lines record and checks
it the way Firecracker would (files must exist, no boot configuration after the start,
a snapshot only of a paused VM...). Its ``mode`` makes it crash at start
(``"crash"``), fail to save a snapshot (``"snapshot-fails"``) or die while loading one
(``"die-on-load"``). The fake jailer builds the jail root and maps the API's ``/``
onto it instead of pivoting into it.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from emberbox.vmm.base import BootFiles, SnapshotFiles, VMConfig

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
        state.setdefault("drives", []).append(body["path_on_host"])
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
            json.dump({"drive": state["drive"], "drives": state.get("drives", []),
                       "vsock": state["vsock"]}, f)
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
        for drive in saved.get("drives") or [saved["drive"]]:
            require_file(drive)  # like Firecracker: every recorded drive path is reopened
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


def write_script(path: Path, source: str) -> Path:
    """``source`` as an executable Python script at ``path``."""
    path.write_text(f"#!{sys.executable}\n{source}")
    path.chmod(0o755)
    return path


def fake_binary(short_tmp: Path, record: Path, mode: str = "ok") -> Path:
    """A fake ``firecracker`` under ``short_tmp/bin`` that records its requests to ``record``."""
    bin_dir = short_tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    source = FAKE_FIRECRACKER.replace("__RECORD__", repr(str(record)))
    return write_script(bin_dir / "firecracker", source.replace("__MODE__", repr(mode)))


def vm_config(short_tmp: Path, guest: BootFiles, vm_id: str, **kw: Any) -> VMConfig:
    """A VM whose work dir is ``short_tmp/vms/<vm_id>``."""
    return VMConfig(vm_id=vm_id, work_dir=short_tmp / "vms" / vm_id, guest=guest, **kw)


def recorded_requests(record: Path) -> list[dict[str, Any]]:
    """What the fake Firecrackers were asked, in order (none: no process ever served)."""
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text().splitlines()]


def sha256_hex(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def is_alive(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie has)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def handmade_snapshot(short_tmp: Path, vmstate: bytes) -> SnapshotFiles:
    """A snapshot directory as the driver writes it, ``vmstate`` as given."""
    directory = short_tmp / "snaps" / "handmade"
    directory.mkdir(parents=True)
    (directory / "vmstate").write_bytes(vmstate)
    (directory / "memory").write_bytes(b"guest memory")
    (directory / "rootfs.ext4").write_bytes(b"ext4 disk")
    return SnapshotFiles(directory, "firecracker", "1.16.1")


GOOD_VMSTATE = json.dumps({"drive": "rootfs.ext4", "vsock": "vsock.sock"}).encode()
"""A ``vmstate`` the fake loads: the drive and vsock paths it recorded at snapshot time."""
