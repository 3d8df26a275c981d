"""The E2B SDKs against a real ``emberbox serve`` (tests/integration/test_e2b_*.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from emberbox.e2b.mount import urls
from emberbox.service.tenancy.keys import e2b_form
from tests.support.keys import make_key
from tests.support.servers import Server, serve_emberbox


@dataclass(frozen=True)
class E2bServer:
    server: Server
    api_url: str
    sandbox_url: str
    key: str  # tenant "alice", set as E2B_API_KEY
    other_key: str  # tenant "bob"


@contextmanager
def e2b_server(data_dir: Path) -> Iterator[E2bServer]:
    """A server with two tenants' keys (in E2B's shape), and the E2B_* variables set
    for alice while it runs."""
    with serve_emberbox(data_dir, EMBERBOX_API_KEY="eb_admin_for_clean_up_" + "0" * 40) as server:
        alice = e2b_form(make_key(data_dir, "--name", "alice"))
        bob = e2b_form(make_key(data_dir, "--name", "bob"))
        api_url, sandbox_url = urls(server.url)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("E2B_API_URL", api_url)
            patch.setenv("E2B_SANDBOX_URL", sandbox_url)
            patch.setenv("E2B_API_KEY", alice)
            patch.delenv("E2B_DOMAIN", raising=False)
            yield E2bServer(server, api_url, sandbox_url, alice, bob)
