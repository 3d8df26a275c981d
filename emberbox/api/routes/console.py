"""``/console``: the web console (docs/console.md), static files only.

The page and its one script (``emberbox/api/console/``) call the REST API with
``fetch()`` and the key the user typed, kept in the tab's ``sessionStorage``; these
routes need no key because they serve nothing but those files. xterm.js comes from
``vendor/``, filled by ``scripts/console-assets.sh`` at set-up (or
``EMBERBOX_CONSOLE_ASSETS_DIR``); without it the console works and says its terminal is
missing.

Every answer carries a Content-Security-Policy that allows scripts from this server
only (no inline script, no eval), connections to this server only, no framing and no
form posts. Styles may be inline: xterm.js writes ``<style>`` elements.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import APIRouter, Response
from fastapi.responses import FileResponse, PlainTextResponse, RedirectResponse

from emberbox.api.deps import SettingsDep
from emberbox.config import Settings

log = logging.getLogger(__name__)

router = APIRouter(prefix="/console", include_in_schema=False)

PAGES_DIR = Path(__file__).resolve().parent.parent / "console"
JS = "text/javascript; charset=utf-8"
CSS = "text/css; charset=utf-8"
PAGES = {"index.html": "text/html; charset=utf-8", "console.js": JS, "console.css": CSS}
VENDOR = {"xterm.mjs": JS, "xterm.css": CSS, "addon-fit.mjs": JS}
CSP = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self' 'unsafe-inline'",
        "connect-src 'self'",
        "img-src 'self' data:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
MISSING = (
    "the console's terminal files are not installed on this server: "
    "run scripts/console-assets.sh (part of make setup)"
)


def vendor_dir(settings: Settings) -> Path:
    return settings.console_assets_dir or PAGES_DIR / "vendor"


@router.get("")
async def console_root() -> Response:
    """``/console`` -> ``/console/``, so that the page's relative links resolve."""
    return RedirectResponse("/console/", headers=SECURITY_HEADERS)


@router.get("/")
async def console_page() -> Response:
    return _file(PAGES_DIR / "index.html", PAGES["index.html"])


@router.api_route("/vendor/{name}", methods=["GET", "HEAD"])  # HEAD: the page checks
async def console_vendor(name: str, settings: SettingsDep) -> Response:
    media_type = VENDOR.get(name)
    path = vendor_dir(settings) / name
    if media_type is None:
        return _not_found()
    if not path.is_file():
        log.warning("console: %s is missing: %s", path, MISSING)
        return PlainTextResponse(MISSING, status_code=404, headers=SECURITY_HEADERS)
    return _file(path, media_type)


@router.get("/{name}")
async def console_file(name: str) -> Response:
    media_type = PAGES.get(name)
    return _not_found() if media_type is None else _file(PAGES_DIR / name, media_type)


def _file(path: Path, media_type: str) -> Response:
    return FileResponse(path, media_type=media_type, headers=SECURITY_HEADERS)


def _not_found() -> Response:
    return PlainTextResponse("not found", status_code=404, headers=SECURITY_HEADERS)
