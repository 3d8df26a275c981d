"""Network targets on this machine for the networking tests: namespaces at public-looking
addresses that answer TCP with a banner, and the guest-side probe that connects to them.

Every target is a network namespace made here, with a veth to the host and a route to
it: nothing leaves the machine.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

PUBLIC_TARGET = "198.51.100.10"  # TEST-NET-2: not in any range the rules always drop
OTHER_PUBLIC_TARGET = "203.0.113.10"  # TEST-NET-3
CONNECT_TIMEOUT_S = 3.0
READY_WAIT_S = 10.0
BANNER = "emberbox-target"

# Started in a target namespace (or on the host): answers every connection with a
# banner naming the address and port it was reached at, on each port of argv.
LISTENER = r"""
import socket, sys, threading
def serve(sock):
    while True:
        conn, _ = sock.accept()
        with conn:
            host, port = conn.getsockname()[:2]
            conn.sendall(f"BANNER {host}:{port}\n".encode())
bind = sys.argv[1]
for port in sys.argv[2:]:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((bind, int(port)))
    sock.listen(64)
    threading.Thread(target=serve, args=(sock,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
""".replace("BANNER", BANNER)

# Run in the guest: connect to each [host, port] at once; the banner, or why not.
PROBE = r"""
import json, socket, sys
from concurrent.futures import ThreadPoolExecutor
def probe(target):
    try:
        with socket.create_connection(tuple(target), timeout=TIMEOUT) as sock:
            sock.settimeout(TIMEOUT)
            return sock.recv(200).decode(errors="replace").strip() or "connected, no banner"
    except OSError as exc:
        return f"error: {type(exc).__name__}: {exc}"
targets = json.loads(sys.argv[1])
with ThreadPoolExecutor(len(targets)) as pool:
    print(json.dumps(list(pool.map(probe, targets))))
""".replace("TIMEOUT", str(CONNECT_TIMEOUT_S))


def run(*argv: str) -> str:
    """The stdout of ``argv`` (which must succeed)."""
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@dataclass
class Listener:
    process: subprocess.Popen[str]

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(10)
        if self.process.stdout is not None:
            self.process.stdout.close()


def start_listener(prefix: list[str], bind: str, ports: list[int]) -> Listener:
    """The banner server (under ``prefix``, e.g. ``ip netns exec NS``), once it listens."""
    process = subprocess.Popen(
        [*prefix, sys.executable, "-c", LISTENER, bind, *map(str, ports)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    listener = Listener(process)
    if process.stdout.readline().strip() != "ready":
        listener.stop()
        raise RuntimeError("listener did not start")
    return listener


@contextlib.contextmanager
def target_namespace(address: str, ports: list[int]) -> Iterator[str]:
    """A namespace at ``address`` (its /24 routed there from the host, the host's end
    at .1) listening on ``ports``; removed on the way out. Yields the address."""
    tag = secrets.token_hex(3)
    name, veth = f"ebtarget-{tag}", f"ebt{tag}"  # not "ebh*": not a sandbox's
    prefix = address.rsplit(".", 1)[0]
    with contextlib.ExitStack() as stack:
        run("ip", "netns", "add", name)
        stack.callback(run, "ip", "netns", "delete", name)
        run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name)
        stack.callback(subprocess.run, ["ip", "link", "delete", veth], check=False)
        run("ip", "address", "add", f"{prefix}.1/24", "dev", veth)
        run("ip", "link", "set", veth, "up")
        inside = ["ip", "-n", name]
        run(*inside, "link", "set", "lo", "up")
        run(*inside, "address", "add", f"{address}/24", "dev", "eth0")
        run(*inside, "link", "set", "eth0", "up")
        run(*inside, "route", "add", "default", "via", f"{prefix}.1")
        listener = start_listener(["ip", "netns", "exec", name], "0.0.0.0", ports)
        stack.callback(listener.stop)
        for port in ports:
            assert host_reaches(address, port), f"target {address}:{port} does not answer"
        yield address


def host_reaches(host: str, port: int) -> bool:
    """True when the host itself gets the banner from ``host:port``."""
    deadline = time.monotonic() + READY_WAIT_S
    while True:
        try:
            with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S) as sock:
                sock.settimeout(CONNECT_TIMEOUT_S)
                return sock.recv(200).decode().startswith(BANNER)
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)


# --- probing from a guest -----------------------------------------------------------------


def sh(client: httpx.Client, sandbox_id: str, cmd: str | list[str]) -> dict[str, Any]:
    """Exec ``cmd`` in the sandbox through the API; its result (must answer 200)."""
    response = client.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"cmd": cmd})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def probe(client: httpx.Client, sandbox_id: str, targets: list[tuple[str, int]]) -> list[str]:
    """What the guest gets connecting to each target (the banner, or the error)."""
    result = sh(client, sandbox_id, ["python3", "-c", PROBE, json.dumps(targets)])
    assert result["exit_code"] == 0, result
    answers: list[str] = json.loads(result["stdout"])
    return answers


def reached(answer: str) -> bool:
    """Whether a probe's answer is a target's banner."""
    return answer.startswith(BANNER)
