"""Fixtures of the store tests: a database path in the test's temp dir and a store open
on it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from emberbox.store import Store


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """Where the database goes (its directory does not exist yet)."""
    return tmp_path / "data" / "emberbox.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[Store]:
    """A store open on ``db_path`` for the test, closed after it."""
    async with await Store.open(db_path) as opened:
        yield opened
