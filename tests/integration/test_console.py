"""The web console in a real browser (Debian's chromium, driven by Playwright) against a
real ``emberbox serve`` with real VMs: sign in, create, a terminal, files, the exec log,
a new timeout, kill; a wrong key; a plain tenant's narrower view.

Each step leaves a screenshot in the test's temp dir and in ``tests/artifacts/console/``
(gitignored), so that a person can look at what the console showed.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from emberbox.images.registry import ImageInfo
from tests.support.paths import REPO
from tests.support.servers import Server, serve_emberbox

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]

CHROMIUM = Path("/usr/bin/chromium")
# Debian's chromium, never a downloaded one (`playwright install` is not used).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = REPO / "tests" / "artifacts" / "console"
BOOT_MS = 300_000  # a create under TCG, template cold
STEP_MS = 30_000
KEY = f"console-test-{secrets.token_hex(16)}"
CLI = "import sys; from emberbox.cli import main; sys.exit(main())"
CONTENT = b"hello from the console\n" + bytes(range(256))


class Screenshots:
    """Numbered screenshots in the test's temp dir, copied to ARTIFACTS as they are taken."""

    def __init__(self, page: Page, folder: Path, prefix: str = "") -> None:
        self.page = page
        self.folder = folder
        self.prefix = prefix
        self.taken: list[Path] = []
        folder.mkdir(parents=True, exist_ok=True)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        for old in ARTIFACTS.glob(f"{prefix}[0-9][0-9]-*.png"):  # a previous run's
            old.unlink()

    def __call__(self, name: str) -> None:
        path = self.folder / f"{self.prefix}{len(self.taken) + 1:02d}-{name}.png"
        self.page.screenshot(path=path, full_page=True)
        shutil.copy2(path, ARTIFACTS / path.name)
        self.taken.append(path)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless chromium from the distribution."""
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium (scripts/setup.sh installs it)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def server(data_dir: Path, default_image: ImageInfo) -> Iterator[Server]:
    """A server that needs a key (its own admin key), without a warm pool."""
    with serve_emberbox(data_dir, EMBERBOX_API_KEY=KEY, EMBERBOX_POOL_SIZE="0") as running:
        yield running


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    opened = context.new_page()
    yield opened
    context.close()


def _sign_in(page: Page, key: str) -> None:
    page.fill("#api-key", key)
    page.click("#signin-form button[type=submit]")


def test_console_from_sign_in_to_kill(server: Server, page: Page, tmp_path: Path) -> None:
    """A wrong key is an error on the sign-in page; the right one shows the list; a
    sandbox is created, `echo hi` in its terminal prints `hi`, a file uploaded is listed
    and downloads back byte for byte, the exec log and the audit log show what ran, a
    snapshot, a pause and a resume, a new timeout shows, and a killed sandbox leaves the
    list. The key is in no URL, no
    cookie and not in the server's log; the page broke no CSP rule."""
    shot = Screenshots(page, tmp_path / "screenshots")
    urls: list[str] = []
    problems: list[str] = []
    page.on("request", lambda request: urls.append(request.url))
    sockets: list[str] = []
    page.on("websocket", lambda socket: sockets.append(socket.url))
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on(
        "console",
        lambda message: (
            problems.append(message.text) if "Content Security Policy" in message.text else None
        ),
    )

    page.goto(f"{server.url}/console")
    expect(page.locator("#signin-view")).to_be_visible()
    _sign_in(page, "eb_000000000000_" + "0" * 64)
    expect(page.locator("#signin-error")).to_contain_text("wrong, unknown or revoked API key")
    expect(page.locator("#app-view")).to_be_hidden()
    shot("wrong-key")

    _sign_in(page, KEY)
    expect(page.locator("#app-view")).to_be_visible()
    expect(page.locator("#who")).to_contain_text("admin")
    expect(page.locator("#create-image option[value=default]")).to_have_count(1)
    expect(page.locator("#no-sandboxes")).to_be_visible()
    shot("signed-in")

    page.fill("#create-timeout", "600")
    page.click("#create-button")
    expect(page.locator("#create-status")).to_contain_text("created", timeout=BOOT_MS)
    sandbox_id = page.inner_text("#create-status").split()[-1]
    row = page.locator(f"#sandboxes tr[data-id='{sandbox_id}']")
    expect(row).to_contain_text("running")
    expect(row).to_contain_text("default")
    expect(row).to_contain_text("1 vCPU · 512 MiB")
    expect(row.locator("td.owner-col")).to_have_text("local", timeout=STEP_MS)
    expect(row.locator("td.left")).to_contain_text(re.compile(r"^(9|10) min"))
    expect(page.locator("#detail-id")).to_have_text(sandbox_id)
    shot("created")

    page.click("#terminal-open")
    expect(page.locator("#terminal-status")).to_contain_text("connected", timeout=STEP_MS)
    expect(page.locator("#terminal .xterm-rows")).to_contain_text("#", timeout=STEP_MS)  # prompt
    page.locator("#terminal .xterm").click()
    page.keyboard.type("echo hi\n")
    hi_line = page.locator("#terminal .xterm-rows > div", has_text=re.compile(r"^\s*hi\s*$"))
    expect(hi_line).to_have_count(1, timeout=STEP_MS)
    shot("terminal-echo-hi")

    upload = tmp_path / "hello.bin"
    upload.write_bytes(CONTENT)
    page.click(".tabs button[data-tab=files]")
    expect(page.locator("#files-status")).to_contain_text("entries", timeout=STEP_MS)
    page.set_input_files("#files-upload", str(upload))
    listed = page.locator("#files tr[data-name='hello.bin']")
    expect(listed).to_be_visible(timeout=STEP_MS)
    expect(listed).to_contain_text(f"{len(CONTENT)} B")
    expect(page.locator("#files-status")).to_contain_text("uploaded hello.bin")
    shot("file-uploaded")

    with page.expect_download(timeout=STEP_MS) as downloading:
        listed.locator("button.download").click()
    download = downloading.value
    assert download.suggested_filename == "hello.bin"
    saved = tmp_path / "downloaded.bin"
    download.save_as(saved)
    assert saved.read_bytes() == CONTENT
    expect(page.locator("#files-status")).to_contain_text("downloaded hello.bin")
    shot("file-downloaded")

    with server.client() as client:
        ran = client.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"cmd": ["uname", "-s"]})
        assert ran.status_code == 200, ran.text
    page.click(".tabs button[data-tab=execs]")
    expect(page.locator("#execs tbody tr")).to_have_count(1, timeout=STEP_MS)
    expect(page.locator("#execs tbody tr")).to_contain_text("uname -s")
    expect(page.locator("#audit-log")).to_contain_text("sandbox.exec", timeout=STEP_MS)
    expect(page.locator("#audit-log")).to_contain_text("file.write")
    shot("exec-and-audit-log")

    page.click("#action-snapshot")
    expect(page.locator("#action-status")).to_contain_text("snapshot ", timeout=BOOT_MS)
    expect(page.locator("#action-status")).not_to_contain_text("…")
    page.click("#action-pause")
    expect(page.locator("#detail-state")).to_have_text("paused", timeout=BOOT_MS)
    expect(row).to_contain_text("paused")
    expect(page.locator("#action-resume")).to_be_enabled()
    expect(page.locator("#terminal-open")).to_be_disabled()
    shot("snapshot-and-paused")
    page.click("#action-resume")
    expect(page.locator("#detail-state")).to_have_text("running", timeout=BOOT_MS)

    page.fill("#timeout-value", "3600")
    page.click("#timeout-form button[type=submit]")
    expect(page.locator("#action-status")).to_have_text("timeout: done", timeout=STEP_MS)
    expect(row.locator("td.left")).to_contain_text(re.compile(r"^(59|60) min|^1 h"))
    shot("timeout-set")

    page.click("#action-kill")
    expect(page.locator("#action-kill")).to_have_text("Really kill?")
    page.click("#action-kill")
    expect(page.locator("#action-status")).to_have_text("kill: done", timeout=STEP_MS)
    expect(row).to_have_count(0, timeout=STEP_MS)
    expect(page.locator("#detail-state")).to_have_text("stopped")
    expect(page.locator("#terminal-open")).to_be_disabled()
    shot("killed")
    page.check("#show-stopped")
    expect(row).to_contain_text("stopped")
    with server.client() as client:
        assert client.get(f"/v1/sandboxes/{sandbox_id}").json()["state"] == "stopped"

    assert not [url for url in urls + sockets if KEY in url]
    assert [url.split("?")[0] for url in sockets] == [
        f"{server.url.replace('http', 'ws')}/v1/sandboxes/{sandbox_id}/pty"
    ]
    assert not [url for url in sockets if "ticket" in url]  # a subprotocol, not the URL
    assert page.context.cookies() == []
    assert KEY not in server.log_path.read_text(errors="replace")
    assert problems == []
    print("\n".join(f"screenshot: {path}" for path in shot.taken))


def test_a_plain_tenant_sees_only_its_own(server: Server, page: Page, tmp_path: Path) -> None:
    """A tenant's key (not an admin's) signs in to an empty list without the owner column
    or the audit log, though the admin has a sandbox; signing out forgets the key."""
    env = {**os.environ, "EMBERBOX_DATA_DIR": str(server.settings.data_dir)}
    env.pop("EMBERBOX_API_KEY", None)
    made = subprocess.run(
        [sys.executable, "-c", CLI, "keys", "create", "--name", "alice"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    alice = made.stdout.strip()
    with server.client() as client:
        created = client.post("/v1/sandboxes", json={}, timeout=BOOT_MS / 1000)
        assert created.status_code == 201, created.text
    shot = Screenshots(page, tmp_path / "screenshots", prefix="tenant-")

    page.goto(f"{server.url}/console/")
    _sign_in(page, alice)
    expect(page.locator("#app-view")).to_be_visible()
    expect(page.locator("#who")).to_have_text(f"key {alice.split('_')[1]}")
    expect(page.locator("#no-sandboxes")).to_be_visible()
    expect(page.locator("#audit")).to_be_hidden()
    expect(page.locator("th.owner-col")).to_be_hidden()
    shot("signed-in")

    page.click("#sign-out")
    expect(page.locator("#signin-view")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0
    assert httpx.get(f"{server.url}/v1/sandboxes", headers={"X-API-Key": alice}).json() == {
        "sandboxes": []
    }


def test_missing_terminal_files_are_named_not_a_blank(
    data_dir: Path, default_image: ImageInfo, page: Page, tmp_path: Path
) -> None:
    """A server without xterm.js (set-up skipped) still serves the console, which says
    at sign-in what to run to get the terminal."""
    empty = tmp_path / "no-assets"
    empty.mkdir()
    env = {"EMBERBOX_API_KEY": KEY, "EMBERBOX_CONSOLE_ASSETS_DIR": str(empty)}
    with serve_emberbox(data_dir, EMBERBOX_POOL_SIZE="0", **env) as server:
        shot = Screenshots(page, tmp_path / "screenshots", prefix="no-assets-")
        page.goto(f"{server.url}/console/")
        _sign_in(page, KEY)
        expect(page.locator("#app-view")).to_be_visible()
        missing = page.locator("#terminal-missing")
        expect(missing).to_contain_text("scripts/console-assets.sh")
        shot("signed-in")
