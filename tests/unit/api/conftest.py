"""Fixtures of the API tests: the real app over a fake manager and a fake image
registry, and an HTTP client talking to it in-process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from emberbox.api import create_app
from emberbox.config import Settings
from tests.support.fakes_manager import FakeManager, FakeRegistry


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings whose directories all live in the test's temp dir."""
    return Settings(data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")


@pytest.fixture
def registry(tmp_path: Path) -> FakeRegistry:
    """Two fake images, `default` and `python`, with real (tiny) files."""
    return FakeRegistry(tmp_path / "images")


@pytest.fixture
def manager(settings: Settings, registry: FakeRegistry) -> FakeManager:
    """An in-memory manager."""
    return FakeManager(settings, registry)


@pytest.fixture
def app(settings: Settings, manager: FakeManager, registry: FakeRegistry) -> FastAPI:
    """The real app over the fakes."""
    return create_app(settings, manager, registry=registry)  # type: ignore[arg-type]


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client talking to the app in-process."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
        yield c
