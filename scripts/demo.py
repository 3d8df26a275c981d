"""`make run`: start the server, create a sandbox through the SDK, run code in it.

Everything it starts (the server, the sandbox) is stopped before it exits, also on
errors and Ctrl-C. What it prints under "guest says" comes from inside the microVM.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from emberbox.sdk import Sandbox

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, server: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"demo: the server exited with status {server.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    sys.exit(f"demo: the server did not answer on {url} within {timeout_s:g} s")


def demo(url: str) -> None:
    started = time.monotonic()
    with Sandbox.create(url=url) as sb:
        print(f"sandbox {sb.id} ready in {time.monotonic() - started:.1f} s")
        result = sb.commands.run("uname -r; python3 -c 'print(6*7)'")
        print(f"host kernel:  {platform.release()}")
        print(f"guest says:   {result.stdout.strip()!r} (exit {result.exit_code})")
    # The seed's two endpoints, as its curl examples call them.
    vm = httpx.post(f"{url}/vm/create", json={"name": "basic_demo", "user_id": "demo"}, timeout=300)
    print(f"POST /vm/create     -> {vm.json()}")
    vm_id = vm.json()["vm_id"]
    out = httpx.post(
        f"{url}/exec/command", json={"vm_id": vm_id, "command": "echo Hello World"}, timeout=60
    )
    print(f"POST /exec/command  -> {out.json()}")
    httpx.delete(f"{url}/v1/sandboxes/{vm_id}", timeout=60)


def main() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "EMBERBOX_PORT": str(port)}
    server = subprocess.Popen([str(VENV_BIN / "emberbox"), "serve"], env=env)
    try:
        wait_healthy(url, server)
        demo(url)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


if __name__ == "__main__":
    main()
