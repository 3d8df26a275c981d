"""The server of the rich exec tests: a real ``emberbox serve`` per test, which the SDK and
the CLI find through ``EMBERBOX_URL``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from emberbox.images.registry import ImageInfo
from tests.support.servers import Server, serve_emberbox


@pytest.fixture
def server(
    data_dir: Path, default_image: ImageInfo, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Server]:
    """A real server; its URL is also EMBERBOX_URL for the SDK and the CLI."""
    with serve_emberbox(data_dir) as running:
        monkeypatch.setenv("EMBERBOX_URL", running.url)
        monkeypatch.delenv("EMBERBOX_API_KEY", raising=False)
        yield running
