"""The soak test's short form (``make soak`` runs the full one): ~35 s of mixed and
hostile load on a server of its own, with the same bars (bench/soak.py)."""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
from collections.abc import Iterator

import pytest

from bench import soak
from tests.support.paths import short_tmp_dir
from tests.support.servers import Server, serve_emberbox

pytestmark = [pytest.mark.vm]
SHORT_S = 35.0


@pytest.fixture(scope="module")
def soak_server() -> Iterator[Server]:
    data_dir = short_tmp_dir("eb-soak-")
    env = {"EMBERBOX_POOL_SIZE": "0", "EMBERBOX_API_KEY": secrets.token_urlsafe(24)}
    try:
        with serve_emberbox(data_dir, **env) as server:
            yield server
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def test_a_short_soak_meets_every_bar(soak_server: Server) -> None:
    """Zero 5xx, server RSS growth within 64 MiB, fds back to baseline, nothing left
    behind, under ~35 s of tenants, hostile guests and abusive clients at once."""
    result = asyncio.run(soak.soak(soak_server, SHORT_S))
    print(json.dumps(result, indent=2))
    failed = [name for name, ok in result["bars"].items() if not ok]
    assert not failed, (failed, result)
