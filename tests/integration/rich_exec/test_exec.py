"""Streamed exec, background processes and terminals through a real ``emberbox serve``
over real VMs (HTTP, the SDK and the CLI)."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest
from websockets.sync.client import ClientConnection, connect

from emberbox.sdk import Sandbox
from tests.support.paths import REPO
from tests.support.server_calls import cli_argv, new_sandbox, run_command
from tests.support.servers import Server

pytestmark = [pytest.mark.vm]


def _until(what: str, check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


# --- streamed exec -----------------------------------------------------------------------


def test_exec_stream_delivers_output_as_it_is_produced(server: Server) -> None:
    """A line every 0.5 s for 3 s: the first NDJSON event arrives within 1 s, the lines
    arrive spread over the run, and the exit event ends the stream."""
    with server.client() as client:
        sandbox_id = new_sandbox(client)
        cmd = "for i in 1 2 3 4 5 6; do echo line $i; sleep 0.5; done"
        arrivals: list[tuple[float, dict[str, Any]]] = []
        started = time.monotonic()
        body = {"cmd": cmd, "stream": True}
        with client.stream("POST", f"/v1/sandboxes/{sandbox_id}/exec", json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "application/x-ndjson"
            for line in response.iter_lines():
                arrivals.append((time.monotonic() - started, json.loads(line)))
    first_s = arrivals[0][0]
    print(f"\nNDJSON first event after {first_s * 1000:.0f} ms")
    assert first_s < 1.0
    lines = [(t, e) for t, e in arrivals if e["type"] == "stdout"]
    assert "".join(e["data"] for _, e in lines) == "".join(f"line {i}\n" for i in range(1, 7))
    assert lines[-1][0] - lines[0][0] >= 2.0  # streamed, not delivered at the end
    assert arrivals[-1][1]["type"] == "exit"
    assert arrivals[-1][1]["exit_code"] == 0


def test_sdk_run_calls_handlers_while_the_command_runs(server: Server) -> None:
    """commands.run(on_stdout=...) sees each line before the command has ended."""
    seen: list[tuple[float, str]] = []
    with Sandbox.create() as sb:
        started = time.monotonic()
        result = sb.commands.run(
            "for i in 1 2 3; do echo $i; sleep 0.5; done; echo oops >&2",
            on_stdout=lambda text: seen.append((time.monotonic() - started, text)),
        )
    assert "".join(text for _, text in seen) == "1\n2\n3\n"
    assert seen[0][0] < 1.0
    assert (result.stdout, result.stderr, result.exit_code) == ("1\n2\n3\n", "oops\n", 0)


# --- background processes ----------------------------------------------------------------


def test_background_http_server_across_execs(server: Server) -> None:
    """A background `python3 -m http.server` keeps serving across other execs, its log
    can be followed, and a signal ends it."""
    with server.client() as client:
        sandbox_id = new_sandbox(client)
        base = f"/v1/sandboxes/{sandbox_id}/processes"
        run_command(client, sandbox_id, "mkdir -p /srv/www && echo served > /srv/www/page")
        cmd = ["python3", "-m", "http.server", "8000", "--bind", "127.0.0.1", "-d", "/srv/www"]
        started = client.post(base, json={"cmd": cmd})
        assert started.status_code == 201, started.text
        pid = started.json()["pid"]
        fetch = (
            'python3 -c "import urllib.request as u; '
            "print(u.urlopen('http://127.0.0.1:8000/page').read().decode(), end='')\""
        )
        _until(
            "the server to answer", lambda: run_command(client, sandbox_id, fetch)["exit_code"] == 0
        )
        for _ in range(3):  # other execs come and go; the server stays
            assert run_command(client, sandbox_id, "echo other")["stdout"] == "other\n"
            assert run_command(client, sandbox_id, fetch)["stdout"] == "served\n"
        assert client.get(f"{base}/{pid}").json()["running"] is True
        listed = client.get(base).json()["processes"]
        assert [(p["pid"], p["running"]) for p in listed] == [(pid, True)]
        events: list[dict[str, Any]] = []
        signalled = False
        with client.stream("GET", f"{base}/{pid}/output", params={"follow": "true"}) as output:
            for line in output.iter_lines():  # its log so far, then live, until it ends
                events.append(json.loads(line))
                if not signalled and "GET /page" in events[-1].get("data", ""):
                    signal = client.post(f"{base}/{pid}/signal", json={"signal": "TERM"})
                    assert signal.status_code == 204, signal.text
                    signalled = True
        log = "".join(e.get("data", "") for e in events)
        assert 'GET /page HTTP/1.1" 200' in log
        assert events[-1]["type"] == "exit"
        status = client.get(f"{base}/{pid}").json()
        assert (status["running"], status["signal"]) == (False, 15)
        assert run_command(client, sandbox_id, fetch)["exit_code"] != 0
        assert client.delete(f"{base}/{pid}").status_code == 204
        assert client.get(f"{base}/{pid}").status_code == 404


def test_sdk_background_handle(server: Server) -> None:
    """run(background=True): send_stdin, wait, kill, and handlers for its output."""
    seen: list[str] = []
    with Sandbox.create() as sb:
        cat = sb.commands.run("cat", background=True, on_stdout=seen.append)
        sb.commands.run("echo meanwhile")
        cat.send_stdin("ping\n")
        cat.send_stdin("pong\n", close=True)
        result = cat.wait()
        assert (result.stdout, result.exit_code) == ("ping\npong\n", 0)
        assert "".join(seen) == "ping\npong\n"
        sleeper = sb.commands.run("sleep 600", background=True)
        assert sleeper.status().running
        sleeper.kill()
        ended = sleeper.wait()
        assert ended.signal == 9
        assert not sleeper.status().running


# --- terminals ---------------------------------------------------------------------------


def _read_until(ws: ClientConnection, pattern: str, timeout_s: float = 30.0) -> str:
    seen = b""
    deadline = time.monotonic() + timeout_s
    while not re.search(pattern, seen.decode(errors="replace")):
        left = deadline - time.monotonic()
        assert left > 0, f"no {pattern!r} in {seen[-500:]!r}"
        message = ws.recv(timeout=left)
        if isinstance(message, bytes):
            seen += message
    return seen.decode(errors="replace")


def test_pty_reports_its_size_resizes_and_ends_with_its_client(server: Server) -> None:
    """`stty size` shows the asked size, then the resized one; `tty` is /dev/pts/N; the
    program ends when the client goes away."""
    with server.client() as client:
        sandbox_id = new_sandbox(client)
        url = server.url.replace("http://", "ws://") + f"/v1/sandboxes/{sandbox_id}/pty"
        with connect(f"{url}?cols=100&rows=30") as ws:
            started = json.loads(ws.recv(timeout=30))
            assert started["type"] == "started"
            pid = started["pid"]
            ws.send(b"stty size; tty\n")
            screen = _read_until(ws, r"/dev/pts/\d+")
            assert "30 100\r\n" in screen, screen  # (the echoed command line has no "30 100")
            ws.send(json.dumps({"type": "resize", "cols": 120, "rows": 40}))
            ws.send(b"stty size\n")
            _read_until(ws, r"40 120\r\n")
            listed = client.get(f"/v1/sandboxes/{sandbox_id}/processes").json()["processes"]
            assert [(p["pid"], p["pty"], p["running"]) for p in listed] == [(pid, True, True)]

        def forgotten() -> bool:
            listed = client.get(f"/v1/sandboxes/{sandbox_id}/processes").json()["processes"]
            return pid not in [p["pid"] for p in listed]

        _until("the terminal's program to end", forgotten)
        assert run_command(client, sandbox_id, f"kill -0 {pid}")["exit_code"] != 0


def test_sdk_pty_session(server: Server) -> None:
    """sb.pty.create: a session whose program's exit code comes back."""
    with Sandbox.create() as sb, sb.pty.create(90, 20) as term:
        term.send("stty size; exit 3\n")
        output = b"".join(term).decode(errors="replace")
        assert "20 90" in output
        assert term.exit_code == 3


def test_cli_shell_with_piped_input(server: Server) -> None:
    """`emberbox sandbox shell ID` relays stdin and exits with the shell's status."""
    with Sandbox.create() as sb:
        done = subprocess.run(
            [*cli_argv(), "sandbox", "shell", sb.id],
            input=b"echo hello-$((6*7)); exit 4\n",
            capture_output=True,
            timeout=120,
            cwd=REPO,
        )
    assert done.returncode == 4, done.stderr
    assert b"hello-42" in done.stdout
