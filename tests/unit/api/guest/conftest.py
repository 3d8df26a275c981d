"""The guest route tests run with a small upload limit (the other fixtures are the API
tests')."""

from __future__ import annotations

from pathlib import Path

import pytest

from emberbox.config import Settings
from tests.support.api_calls import UPLOAD_LIMIT


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings in the test's temp dir, with a small upload limit."""
    return Settings(
        data_dir=tmp_path / "d", cache_dir=tmp_path / "c", max_upload_bytes=UPLOAD_LIMIT
    )
