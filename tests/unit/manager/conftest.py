"""Fixtures of the manager tests: small limits, the fake VMM (and the processes it
spawned) and a started manager over it."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from emberbox.config import Settings
from emberbox.service.sandboxes.manager import SandboxManager
from tests.support.fakes_sandbox import FakeVMM, end_process
from tests.support.sandbox_manager import make_manager


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        cache_dir=tmp_path / "cache",
        max_sandboxes=3,
        pool_size=0,
        max_vcpus=2,
        max_memory_mib=1024,
        max_timeout_s=600,
        default_exec_timeout_s=30,
        max_exec_timeout_s=120,
        exec_output_max_bytes=4096,
        reaper_interval_s=0.05,
    )


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test spawned; all ended and reaped afterwards."""
    spawned: list[subprocess.Popen[bytes]] = []
    yield spawned
    for proc in spawned:
        end_process(proc)


@pytest.fixture
def vmm(procs: list[subprocess.Popen[bytes]]) -> FakeVMM:
    fake = FakeVMM()
    fake.procs = procs
    return fake


@pytest.fixture
async def manager(settings: Settings, vmm: FakeVMM) -> AsyncIterator[SandboxManager]:
    async with make_manager(settings, vmm) as opened:
        yield opened
