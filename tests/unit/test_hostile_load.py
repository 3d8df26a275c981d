"""Hostile load, the pure parts: the failed-key lockout, keyless callers, how uvicorn is
configured, its slowloris guard, and commands too big for one agent frame."""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import uvicorn
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from emberbox import errors
from emberbox.agent_client.spec import ExecSpec
from emberbox.api import create_app
from emberbox.api.serving import raise_fd_limit, uvicorn_options
from emberbox.config import Settings
from emberbox.service.policy import host_allowed, keyless_refusal
from emberbox.service.sandboxes.validation import check_frame
from emberbox.service.snapshots.diskquota import MIB, DiskQuota
from emberbox.service.tenancy import keys
from emberbox.service.tenancy.access import FAILED_AUTH_BURST, LOCAL, Tenancy
from emberbox.service.tenancy.sockets import SocketSlots
from emberbox.store import ExecLogEntry, SnapshotRow, Store, tenants, utcnow
from emberbox.store.db import connect
from emberbox.store.sandboxes import insert_exec, insert_sandbox, prune_history
from emberbox.store.tenants import AuditEntry
from tests.support.fakes_manager import FakeManager, FakeRegistry
from tests.support.rows import make_row
from tests.support.servers import serving


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")


@pytest.fixture
def db(settings: Settings) -> Iterator[sqlite3.Connection]:
    conn = connect(settings.db_path)
    yield conn
    conn.close()


@pytest.mark.anyio
async def test_a_valid_key_is_never_locked_out_by_others_failures(
    settings: Settings, db: sqlite3.Connection
) -> None:
    """Wrong keys from one address lock out further wrong keys from it (429), never a
    valid key sent from the same address (issue #15: the next valid key was a 429)."""
    tenancy = Tenancy(settings)
    good = keys.create_key(db, "alice")
    try:
        for _ in range(FAILED_AUTH_BURST):
            with pytest.raises(errors.Unauthorized):
                await tenancy.authenticate("eb_000000000000_" + "0" * 64, "127.0.0.1")
        with pytest.raises(errors.RateLimited):
            await tenancy.authenticate("nonsense", "127.0.0.1")
        principal = await tenancy.authenticate(good.key, "127.0.0.1")
        assert principal.tenant_name == "alice"
        with pytest.raises(errors.RateLimited):  # the guesser is still locked out
            await tenancy.authenticate(good.key[:-1] + "x", "127.0.0.1")
    finally:
        await tenancy.close()


@pytest.mark.anyio
async def test_keyless_mode_checks_the_connection_not_only_the_setting(
    settings: Settings,
) -> None:
    """A server configured for loopback but reached from elsewhere (bound to 0.0.0.0
    through uvicorn's factory) or under another Host name refuses keyless requests."""
    tenancy = Tenancy(settings)
    try:
        assert await tenancy.authenticate(None, "127.0.0.1", server="127.0.0.1") == LOCAL
        with pytest.raises(errors.Unauthorized, match=r"client 192\.0\.2\.4"):
            await tenancy.authenticate(None, "192.0.2.4", server="127.0.0.1")
        with pytest.raises(errors.Unauthorized, match=r"server address 192\.0\.2\.1"):
            await tenancy.authenticate(None, "127.0.0.1", server="192.0.2.1")
        with pytest.raises(errors.Unauthorized, match="EMBERBOX_ALLOWED_HOSTS"):
            await tenancy.authenticate(None, "127.0.0.1", host_header="rebind.example:8080")
    finally:
        await tenancy.close()


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("localhost", True),
        ("LOCALHOST.:8080", True),
        ("127.0.0.1:8080", True),
        ("127.1.2.3", True),
        ("[::1]:8080", True),
        ("[::ffff:127.0.0.1]", True),
        ("x.localhost", True),
        ("box.internal", True),  # listed in allowed_hosts
        ("attacker.example", False),
        ("localhost.attacker.example", False),
        ("10.0.0.1", False),
    ],
)
def test_the_host_allowlist(settings: Settings, host: str, allowed: bool) -> None:
    """Localhost names, loopback addresses and listed names pass; others do not."""
    listed = settings.model_copy(update={"allowed_hosts": ["box.internal"]})
    assert host_allowed(host, listed) is allowed


def test_keyless_refusal_names_the_reason(settings: Settings) -> None:
    """Each refusal says what was not loopback."""
    ok = keyless_refusal(settings, client="::1", server="::1", host_header="localhost")
    assert ok is None
    assert keyless_refusal(settings, client="", server="", host_header=None) is None  # unix
    wide = settings.model_copy(update={"host": "0.0.0.0"})
    refusal = keyless_refusal(wide, client="127.0.0.1", server="127.0.0.1", host_header=None)
    assert refusal == "keys are needed beyond loopback"


def test_uvicorn_options_bound_connections_and_trust_no_proxy(settings: Settings) -> None:
    """Timeouts and caps come from settings; proxy headers are off unless configured."""
    options = uvicorn_options(settings)
    assert options["limit_concurrency"] == 1000
    assert options["timeout_keep_alive"] == 5
    assert options["proxy_headers"] is False
    assert options["h11_max_incomplete_event_size"] == 16 * 1024
    proxied = uvicorn_options(settings.model_copy(update={"forwarded_allow_ips": ["10.0.0.2"]}))
    assert (proxied["proxy_headers"], proxied["forwarded_allow_ips"]) == (True, ["10.0.0.2"])


def test_the_fd_limit_is_raised_to_the_hard_limit() -> None:
    """The soft RLIMIT_NOFILE ends at the hard one (or where it was, if refused)."""
    soft, hard = raise_fd_limit()
    assert soft == hard or soft > 0


async def _hello(scope: dict[str, object], receive: object, send: object) -> None:
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
    await send({"type": "http.response.body", "body": b"hi"})  # type: ignore[operator]


@pytest.fixture
def guarded_server(settings: Settings) -> Iterator[tuple[int, uvicorn.Server]]:
    """Our uvicorn options (0.5 s header timeout, 4 connections) around a tiny app."""
    tight = settings.model_copy(update={"request_header_timeout_s": 0.5, "max_connections": 4})
    options = uvicorn_options(tight)
    options.update(host="127.0.0.1", port=0, lifespan="off", log_level="warning")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(_hello, **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    yield sock.getsockname()[1], server
    server.should_exit = True
    thread.join(10)
    sock.close()


def _closed_within(conn: socket.socket, seconds: float) -> bool:
    conn.settimeout(seconds)
    try:
        return conn.recv(1024) == b""
    except (TimeoutError, ConnectionResetError):
        return False


def test_half_sent_headers_are_closed_after_the_timeout(
    guarded_server: tuple[int, uvicorn.Server],
) -> None:
    """A connection that trickles its headers, or sends nothing, is closed once
    request_header_timeout_s has passed (issue #15: 800 stayed open for 20 s+)."""
    port, _ = guarded_server
    silent = socket.create_connection(("127.0.0.1", port))
    trickle = socket.create_connection(("127.0.0.1", port))
    started = time.monotonic()
    trickle.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
    with silent, trickle:
        assert _closed_within(trickle, 3) and _closed_within(silent, 3)
    assert 0.4 < time.monotonic() - started < 3
    with socket.create_connection(("127.0.0.1", port)) as whole:
        whole.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert whole.recv(1024).startswith(b"HTTP/1.1 200")


def test_connections_past_the_cap_are_closed(guarded_server: tuple[int, uvicorn.Server]) -> None:
    """Past max_connections a new connection is closed at once."""
    port, _ = guarded_server
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    time.sleep(0.1)
    extra = socket.create_connection(("127.0.0.1", port))
    assert _closed_within(extra, 0.4)
    for conn in [*held, extra]:
        conn.close()


def test_a_command_over_the_agent_frame_is_413() -> None:
    """argv, env and stdin that would not fit in one agent frame are PayloadTooLarge
    (413), not the agent link's ProtocolViolation (a 500 in issue #15)."""
    check_frame(ExecSpec(cmd=("cat",), stdin=b"x" * (512 << 10)))
    with pytest.raises(errors.PayloadTooLarge) as caught:
        check_frame(ExecSpec(cmd=("cat",), env={"A": "x" * (600 << 10)}, stdin=b"x" * (400 << 10)))
    assert caught.value.status_code == 413
    assert caught.value.details["quota"] == "agent_frame_bytes"


def test_websocket_slots_per_tenant() -> None:
    """A tenant holds at most its limit of open sockets; closing one frees a slot, and
    other tenants are not counted against it."""
    slots = SocketSlots(2)
    with slots.hold("a"), slots.hold("a"):
        with pytest.raises(errors.QuotaExceeded) as caught:
            slots.hold("a")
        assert caught.value.details["quota"] == "tenant_max_websockets"
        with slots.hold("b"):
            assert slots.used("b") == 1
    assert slots.used("a") == 0
    with slots.hold("a"):
        assert slots.used("a") == 1


def test_audit_details_are_cut_to_a_byte_limit_and_old_rows_pruned(
    db: sqlite3.Connection,
) -> None:
    """A detail of megabytes is stored as its 2 KiB head; pruning drops rows past the
    retention age and all but the newest N (issue #15: the audit log grew without bound)."""
    now = utcnow()
    huge = AuditEntry("local", "sandbox.exec", "ok", detail={"cmd": ["x" * (1 << 20)]})
    tenants.insert_audit(db, huge)
    stored = db.execute("SELECT detail FROM audit_log").fetchone()[0]
    assert len(stored) < tenants.AUDIT_DETAIL_MAX_BYTES
    assert json.loads(stored)["bytes"] > 1 << 20
    old = AuditEntry("local", "sandbox.kill", "ok", at=now - timedelta(days=100))
    tenants.insert_audit(db, old)
    for _ in range(5):
        tenants.insert_audit(db, AuditEntry("local", "sandbox.create", "ok"))
    gone = tenants.prune_audit(db, before=now - timedelta(days=90), keep_rows=3)
    assert gone == 4  # the old one, then the two oldest of the rest
    assert [e.action for e in tenants.list_audit(db)] == ["sandbox.create"] * 3


def test_ended_sandboxes_and_old_exec_log_entries_are_pruned(db: sqlite3.Connection) -> None:
    """Ended sandboxes past their retention go with their exec logs, unless a snapshot
    names them; live ones stay; the exec log keeps its newest N."""
    now = utcnow()
    long_ago = now - timedelta(days=30)
    insert_sandbox(db, make_row("old-stopped", state="stopped", updated_at=long_ago))
    insert_sandbox(db, make_row("old-running", state="running", updated_at=long_ago))
    insert_sandbox(db, make_row("new-stopped", state="stopped", updated_at=now))
    for _ in range(4):
        for sandbox_id in ("old-stopped", "old-running"):
            entry = ExecLogEntry(sandbox_id, ["true"], now, 1.0, exit_code=0)
            insert_exec(db, entry)
    ended, execs = prune_history(
        db,
        ended_before=now - timedelta(days=7),
        execs_before=now - timedelta(days=7),
        max_execs=3,
    )
    left = {row[0] for row in db.execute("SELECT id FROM sandboxes")}
    assert left == {"old-running", "new-stopped"}
    assert ended == 1
    assert db.execute("SELECT count(*) FROM exec_log").fetchone()[0] == 3
    assert execs == 1  # the other 4 went with their sandbox


@pytest.mark.anyio
async def test_the_disk_quota_weighs_saved_vms_and_reservations(
    settings: Settings, tmp_path: Path
) -> None:
    """A save reserves its RAM plus its work dir against the tenant's snapshots' sizes and
    the saves still running; past tenant_max_snapshot_bytes it is a 403 naming the quota,
    and a reservation is given back when its save ends, failed or not (issue #15: 16
    snapshots of a 4 GiB sandbox were ~90 GiB)."""
    store = await Store.open(settings.db_path)
    quota = DiskQuota(2 * 1024 * MIB)
    row = make_row("sb-a", tenant_id="t1", memory_mib=600, work_dir=tmp_path / "none")
    try:
        async with quota.reserve(store, row) as wanted:
            assert wanted == 600 * MIB
            with pytest.raises(errors.QuotaExceeded) as caught:
                async with quota.reserve(store, make_row("sb-b", tenant_id="t1", memory_mib=1500)):
                    pass
            assert caught.value.details["quota"] == "tenant_max_snapshot_bytes"
            assert caught.value.status_code == 403
            async with quota.reserve(store, make_row("sb-c", tenant_id="t2", memory_mib=1500)):
                pass  # another tenant's room is its own
        with pytest.raises(RuntimeError):
            async with quota.reserve(store, row):
                raise RuntimeError("the save failed")
        assert quota.reserved("t1") == 0
        snap = SnapshotRow(
            "snap-1", "sb-a", "default", 1, 600, "qemu", "7", 1800 * MIB, utcnow(), tmp_path,
            tenant_id="t1",
        )  # fmt: skip
        await store.insert_snapshot(snap)
        with pytest.raises(errors.QuotaExceeded):
            async with quota.reserve(store, row):
                pass
    finally:
        await store.close()


def test_open_websockets_are_capped_per_tenant(settings: Settings, tmp_path: Path) -> None:
    """With tenant_max_websockets=1 a second terminal of the same tenant is refused (403
    in its closing frame) while the first is open, and opens once the first closed."""
    capped = settings.model_copy(update={"tenant_max_websockets": 1})
    manager = FakeManager(capped, FakeRegistry(tmp_path / "images"))
    app = create_app(capped, manager, registry=manager.registry)  # type: ignore[arg-type]
    with serving(app) as url:
        sandbox_id = httpx.post(f"{url}/v1/sandboxes", json={}).json()["id"]
        ws_url = url.replace("http://", "ws://") + f"/v1/sandboxes/{sandbox_id}/pty"
        with ws_connect(ws_url, open_timeout=5) as first:
            assert json.loads(first.recv(timeout=5))["type"] == "started"
            with ws_connect(ws_url, open_timeout=5) as second:
                error = json.loads(second.recv(timeout=5))["error"]
                assert (error["type"], error["quota"]) == ("QuotaExceeded", "tenant_max_websockets")
                with pytest.raises(ConnectionClosed) as closed:
                    second.recv(timeout=5)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 4403
        with ws_connect(ws_url, open_timeout=5) as again:
            assert json.loads(again.recv(timeout=5))["type"] == "started"
