"""The Firecracker rows: ``bench/firecracker.py`` (its own module, another engineer's)
measures start and snapshot against the real binary; this section calls it when both
the module and the binary are there, and keeps its result under ``"firecracker"``."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import anyio.to_thread

from bench.harness import Skip, progress
from bench.stats import Report

BINARY = Path(__file__).resolve().parents[2] / "shared" / "firecracker" / "bin" / "firecracker"
MODULE = "bench.firecracker"
KEY = "firecracker"


def measurer() -> Callable[[bool], dict[str, object]]:
    """``bench.firecracker.measure``; Skip (with why) when it or the binary is missing."""
    if importlib.util.find_spec(MODULE) is None:
        raise Skip(f"no {MODULE} module")
    if not BINARY.is_file():
        raise Skip(f"no Firecracker binary at {BINARY}")
    measure = getattr(importlib.import_module(MODULE), "measure", None)
    if not callable(measure):
        raise Skip(f"{MODULE} has no measure(quick)")
    return cast("Callable[[bool], dict[str, object]]", measure)


async def firecracker(quick: bool, report: Report) -> None:
    measure = measurer()
    progress("firecracker: start and snapshot against the real binary")
    result: dict[str, Any] = await anyio.to_thread.run_sync(measure, quick)
    report.extra[KEY] = result
