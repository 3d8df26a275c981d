"""The web console without a browser: terminal tickets (single use, expiry, bound to a
sandbox and a tenant), the WebSocket Origin check, the console's static routes and
their Content-Security-Policy."""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from fastapi.testclient import TestClient
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from emberbox import errors
from emberbox.api import create_app
from emberbox.api.browsers import (
    PTY_PROTOCOL,
    TICKET_PREFIX,
    check_origin,
    chosen_protocol,
    offered_ticket,
    origin_allowed,
)
from emberbox.api.routes.console import CSP, PAGES_DIR
from emberbox.config import Settings
from emberbox.service.tenancy import keys
from emberbox.service.tenancy.access import Principal
from emberbox.service.tenancy.tickets import TicketBook
from emberbox.store import Store
from emberbox.store.db import connect as connect_db
from tests.support.fakes_manager import FakeManager, FakeRegistry
from tests.support.rows import make_row
from tests.support.servers import serving

ALICE = Principal("tn-alice", "alice", admin=False, key_id="a1")
BOB = Principal("tn-bob", "bob", admin=False, key_id="b1")


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


# --- tickets -----------------------------------------------------------------------------


def test_a_ticket_opens_its_sandbox_once_as_its_issuer() -> None:
    """Redeeming gives back the issuing principal (tenant, key, admin flag); a second
    redeem of the same ticket is refused."""
    book = TicketBook(30.0, 100, clock=Clock())
    ticket = book.issue(ALICE, "sb-1")
    assert len(ticket) >= 40 and re.fullmatch(r"[A-Za-z0-9_-]+", ticket)
    assert book.redeem(ticket, "sb-1") == ALICE
    with pytest.raises(errors.Unauthorized, match="unknown, used or expired"):
        book.redeem(ticket, "sb-1")
    assert len(book) == 0


def test_tickets_expire() -> None:
    """A ticket is good until its lifetime is over, not after; expired ones are dropped
    when the next is issued."""
    clock = Clock()
    book = TicketBook(30.0, 100, clock=clock)
    early, late = book.issue(ALICE, "sb-1"), book.issue(ALICE, "sb-1")
    clock.now += 29.9
    assert book.redeem(early, "sb-1") == ALICE
    clock.now += 0.1
    with pytest.raises(errors.Unauthorized):
        book.redeem(late, "sb-1")
    book.issue(ALICE, "sb-1")
    clock.now += 31
    book.issue(BOB, "sb-2")
    assert len(book) == 1


def test_a_ticket_for_another_sandbox_is_refused_and_used_up() -> None:
    """A ticket names one sandbox: tried on another it fails, and it is gone after."""
    book = TicketBook(30.0, 100, clock=Clock())
    ticket = book.issue(ALICE, "sb-1")
    with pytest.raises(errors.Unauthorized):
        book.redeem(ticket, "sb-2")
    with pytest.raises(errors.Unauthorized):
        book.redeem(ticket, "sb-1")


def test_tickets_are_bound_to_their_tenant_and_capped() -> None:
    """Two tenants' tickets for one sandbox each give back their own tenant; past the
    cap the oldest ticket is dropped; a made-up ticket is refused."""
    book = TicketBook(30.0, 2, clock=Clock())
    alices, bobs = book.issue(ALICE, "sb-1"), book.issue(BOB, "sb-1")
    assert alices != bobs
    assert book.redeem(bobs, "sb-1") == BOB
    third, fourth = book.issue(BOB, "sb-1"), book.issue(ALICE, "sb-1")
    assert len(book) == 2
    with pytest.raises(errors.Unauthorized):
        book.redeem(alices, "sb-1")  # the oldest, dropped for the fourth
    assert book.redeem(third, "sb-1") == BOB and book.redeem(fourth, "sb-1") == ALICE
    with pytest.raises(errors.Unauthorized):
        book.redeem("x" * 43, "sb-1")


def test_subprotocols_carry_the_ticket() -> None:
    """The ticket is read from `emberbox.ticket.<t>`; the server answers `emberbox.pty`
    only when it was offered, never the ticket protocol."""
    offered = [PTY_PROTOCOL, f"{TICKET_PREFIX}abc"]
    assert offered_ticket(offered) == "abc"
    assert offered_ticket([PTY_PROTOCOL, TICKET_PREFIX]) is None
    assert offered_ticket(["chat"]) is None
    assert chosen_protocol(offered) == PTY_PROTOCOL
    assert chosen_protocol([f"{TICKET_PREFIX}abc"]) is None


# --- Origin ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "host", "allowed", "ok"),
    [
        ("http://127.0.0.1:8080", "127.0.0.1:8080", [], True),
        ("HTTP://LocalHost:8080", "localhost:8080", [], True),
        ("https://box.example", "box.example", [], True),  # behind a TLS proxy
        ("http://box.example", "box.example:80", [], True),
        ("https://box.example:8443", "box.example", [], False),
        ("http://127.0.0.1:9999", "127.0.0.1:8080", [], False),
        ("http://evil.example:8080", "127.0.0.1:8080", [], False),
        ("http://[::1]:8080", "[::1]:8080", [], True),
        ("null", "127.0.0.1:8080", [], False),
        ("file://", "127.0.0.1:8080", [], False),
        ("http://127.0.0.1:8080/path", "127.0.0.1:8080", [], False),
        ("http://127.0.0.1:99999", "127.0.0.1:8080", [], False),
        ("http://127.0.0.1:8080", None, [], False),
        ("https://ops.example", "10.0.0.5:8080", ["https://ops.example"], True),
        ("https://ops.example:443", "10.0.0.5:8080", ["https://ops.example/"], True),
        ("http://ops.example", "10.0.0.5:8080", ["https://ops.example"], False),
    ],
)
def test_origin_allowed(origin: str, host: str | None, allowed: list[str], ok: bool) -> None:
    """Same host and port as the Host header (scheme aside), or an allowlisted origin."""
    assert origin_allowed(origin, host, allowed) is ok


def test_check_origin_passes_clients_without_an_origin() -> None:
    """Scripts and the SDK send no Origin: nothing to check; a foreign one is a 401."""
    check_origin(None, "127.0.0.1:8080", [])
    with pytest.raises(errors.Unauthorized, match="origin"):
        check_origin("http://evil.example", "127.0.0.1:8080", [])


# --- the terminal over HTTP and WebSocket ------------------------------------------------


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")


@pytest.fixture
def db(settings: Settings) -> Iterator[sqlite3.Connection]:
    conn = connect_db(settings.db_path)
    yield conn
    conn.close()


def _ws(url: str, sandbox_id: str, **kwargs: object) -> ClientConnection:
    ws_url = url.replace("http://", "ws://") + f"/v1/sandboxes/{sandbox_id}/pty"
    return connect(ws_url, open_timeout=5, **kwargs)  # type: ignore[arg-type]


def _refused(ws: ClientConnection) -> tuple[str, int | None]:
    """The error frame's type and the close code of a refused terminal."""
    error = json.loads(ws.recv(timeout=5))["error"]["type"]
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=5)
    return error, closed.value.rcvd.code if closed.value.rcvd else None


def _ticket(url: str, sandbox_id: str, key: str | None = None) -> list[str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    answer = httpx.post(f"{url}/v1/sandboxes/{sandbox_id}/pty/ticket", headers=headers)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["expires_in_s"] == 30.0
    assert body["protocols"] == [PTY_PROTOCOL, TICKET_PREFIX + body["ticket"]]
    protocols: list[str] = body["protocols"]
    return protocols


def test_a_browser_opens_the_terminal_with_a_ticket_once(
    settings: Settings, tmp_path: Path
) -> None:
    """Local mode: a ticket from the API opens the terminal (answered `emberbox.pty`) from
    the server's own origin; the same ticket again, or from another origin, is 4401."""
    manager = FakeManager(settings, FakeRegistry(tmp_path / "images"))
    app = create_app(settings, manager, registry=manager.registry)  # type: ignore[arg-type]
    with serving(app) as url:
        sandbox_id = httpx.post(f"{url}/v1/sandboxes", json={}).json()["id"]
        protocols = _ticket(url, sandbox_id)
        with _ws(url, sandbox_id, subprotocols=protocols, origin=url) as ws:
            assert ws.subprotocol == PTY_PROTOCOL
            assert json.loads(ws.recv(timeout=5))["type"] == "started"
        with _ws(url, sandbox_id, subprotocols=protocols, origin=url) as ws:
            assert _refused(ws) == ("Unauthorized", 4401)
        fresh = _ticket(url, sandbox_id)
        with _ws(url, sandbox_id, subprotocols=fresh, origin="http://evil.example") as ws:
            assert _refused(ws) == ("Unauthorized", 4401)
        with _ws(url, sandbox_id, origin="http://evil.example") as ws:  # keyless, local mode
            assert _refused(ws) == ("Unauthorized", 4401)
        with _ws(url, sandbox_id) as ws:  # no Origin: a script, as before
            assert json.loads(ws.recv(timeout=5))["type"] == "started"


def test_tickets_keep_to_their_tenant_and_sandbox(
    settings: Settings, db: sqlite3.Connection, tmp_path: Path
) -> None:
    """Bob gets no ticket for Alice's sandbox (404 as for an unknown id); Alice's ticket
    fails on another sandbox and beside Bob's key; a header key still works as before."""
    manager = FakeManager(settings, FakeRegistry(tmp_path / "images"))
    app = create_app(settings, manager, registry=manager.registry)  # type: ignore[arg-type]
    alice, bob = keys.create_key(db, "alice"), keys.create_key(db, "bob")
    own = {alice.key: alice.tenant.id, bob.key: bob.tenant.id}
    with serving(app) as url:
        ids = {}
        for key, tenant_id in own.items():
            made = httpx.post(f"{url}/v1/sandboxes", json={}, headers={"X-API-Key": key})
            ids[key] = made.json()["id"]
            anyio.run(_own, settings, ids[key], tenant_id)
        alices, bobs = ids[alice.key], ids[bob.key]
        stolen = httpx.post(
            f"{url}/v1/sandboxes/{alices}/pty/ticket", headers={"X-API-Key": bob.key}
        )
        assert stolen.status_code == 404 and stolen.json()["error"]["type"] == "NotFound"
        elsewhere = _ticket(url, alices, alice.key)
        with _ws(url, bobs, subprotocols=elsewhere, origin=url) as ws:
            assert _refused(ws) == ("Unauthorized", 4401)
        both = _ticket(url, alices, alice.key)
        headers = {"X-API-Key": bob.key}
        with _ws(url, alices, subprotocols=both, additional_headers=headers) as ws:
            assert _refused(ws) == ("Unauthorized", 4401)
        with _ws(url, alices, subprotocols=_ticket(url, alices, alice.key), origin=url) as ws:
            assert json.loads(ws.recv(timeout=5))["type"] == "started"
        with _ws(url, bobs, additional_headers=headers) as ws:
            assert ws.subprotocol is None
            assert json.loads(ws.recv(timeout=5))["type"] == "started"
        audit = [e for e in _audit(db) if e[1] == "terminal.open"]
        assert audit == [
            (alice.tenant.id, "terminal.open", "ok"),
            (bob.tenant.id, "terminal.open", "ok"),
        ]


async def _own(settings: Settings, sandbox_id: str, tenant_id: str) -> None:
    """Record the fake manager's sandbox in the database as ``tenant_id``'s."""
    store = await Store.open(settings.db_path)
    try:
        await store.insert(make_row(sandbox_id, tenant_id=tenant_id))
    finally:
        await store.close()


def _audit(db: sqlite3.Connection) -> list[tuple[str, str, str]]:
    rows = db.execute("SELECT tenant_id, action, outcome FROM audit_log ORDER BY id").fetchall()
    return [(str(t), str(a), str(o)) for t, a, o in rows]


def test_a_ticket_outlives_nothing(settings: Settings, tmp_path: Path) -> None:
    """With a 50 ms lifetime a ticket used after 100 ms is refused."""
    short = settings.model_copy(update={"pty_ticket_ttl_s": 0.05})
    manager = FakeManager(short, FakeRegistry(tmp_path / "images"))
    app = create_app(short, manager, registry=manager.registry)  # type: ignore[arg-type]
    with serving(app) as url:
        sandbox_id = httpx.post(f"{url}/v1/sandboxes", json={}).json()["id"]
        answer = httpx.post(f"{url}/v1/sandboxes/{sandbox_id}/pty/ticket").json()
        anyio.run(anyio.sleep, 0.1)
        with _ws(url, sandbox_id, subprotocols=answer["protocols"]) as ws:
            assert _refused(ws) == ("Unauthorized", 4401)
        unknown = httpx.post(f"{url}/v1/sandboxes/nope/pty/ticket")
        assert unknown.status_code == 404


# --- the console's files -----------------------------------------------------------------


@pytest.fixture
def console(settings: Settings, tmp_path: Path) -> Iterator[TestClient]:
    vendor = tmp_path / "vendor"
    vendor.mkdir()
    (vendor / "xterm.mjs").write_text("export class Terminal {}\n")
    with_assets = settings.model_copy(update={"console_assets_dir": vendor})
    manager = FakeManager(with_assets, FakeRegistry(tmp_path / "images"))
    app = create_app(with_assets, manager, registry=manager.registry)  # type: ignore[arg-type]
    # no lifespan: the fake manager needs none; a loopback client, as keyless mode wants
    yield TestClient(app, base_url="http://localhost", client=("127.0.0.1", 50000))


def test_console_routes(console: TestClient) -> None:
    """/console redirects to /console/; the page, its script and style and the vendor
    files are served with the CSP; a missing vendor file is a 404 that says what to run;
    anything else under /console is a 404, traversal included; no key is needed."""
    redirect = console.get("/console", follow_redirects=False)
    assert redirect.status_code == 307 and redirect.headers["location"] == "/console/"
    for path, kind in [
        ("/console/", "text/html"),
        ("/console/console.js", "text/javascript"),
        ("/console/console.css", "text/css"),
        ("/console/vendor/xterm.mjs", "text/javascript"),
    ]:
        answer = console.get(path)
        assert answer.status_code == 200, path
        assert answer.headers["content-type"].startswith(kind)
        assert answer.headers["content-security-policy"] == CSP
        assert answer.headers["x-content-type-options"] == "nosniff"
    missing = console.get("/console/vendor/addon-fit.mjs")
    assert missing.status_code == 404 and "console-assets.sh" in missing.text
    assert console.head("/console/vendor/xterm.mjs").status_code == 200
    assert console.head("/console/vendor/addon-fit.mjs").status_code == 404
    for path in ("/console/app.py", "/console/vendor/..%2fconsole.py", "/console/../app.py"):
        assert console.get(path).status_code == 404, path
    assert "/console/" not in console.get("/openapi.json").text


def test_the_csp_forbids_inline_script_and_the_page_has_none() -> None:
    """script-src is 'self' alone; the page's only script is the module file, and no
    element has an inline event handler."""
    directives = dict(part.split(" ", 1) for part in CSP.split("; "))
    assert directives["script-src"] == "'self'"
    assert directives["connect-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"
    page = (PAGES_DIR / "index.html").read_text()
    scripts = re.findall(r"<script\b[^>]*>(.*?)</script>", page, re.S)
    assert scripts == [""]
    assert '<script type="module" src="console.js">' in page
    assert not re.search(r"\son[a-z]+\s*=", page)
    script = (PAGES_DIR / "console.js").read_text()
    assert not re.search(r"\.innerHTML|localStorage\.|document\.cookie|\beval\(", script)
    assert "sessionStorage.setItem(KEY_ITEM, key)" in script
