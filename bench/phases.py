"""Where create -> first exec goes, phase by phase, for template restores and the pool.

Each sample is ``create()`` + ``exec(["true"])`` on a manager; the VM's own timing points
(:class:`emberbox.vmm.phases.Phases`: disk overlay, QEMU spawn, host cgroup, QMP,
migrate-incoming, agent hello, network, hand-out hello) come from the sandbox the manager
holds. What ``create()`` took beyond those is the service's own work (admission, the
store's rows, the state moves): the row ``service (admission, store writes)``. The first
exec is timed on its own. A pooled VM's restore happened before the create, while it sat
in the pool, so the pool's rows are only what the hand-out does. A template restore
loads its state into the spare VMM of its shape (started ahead, waiting with
``-incoming defer``; :mod:`emberbox.service.vm.spares`): that VMM's start shows in the
"made ahead" column too, and, as the pool is filled again before each sample, the spare
is waited for.
"""

from __future__ import annotations

import time
from typing import Any

from bench.create import EXEC_RTT
from bench.harness import TRUE, Variant, ms_since, progress, wait_pool_full, wait_spares
from bench.stats import Measurement, Report
from emberbox.service.sandboxes.manager import SandboxManager
from emberbox.vmm.phases import phases_of

PREFIX = "phase"
SERVICE = "service (admission, store writes)"
FIRST_EXEC = "first exec `true`"
TOTAL = "= create -> first exec"
AHEAD = "(made ahead, not in the create)"


def row_name(variant: str, phase: str) -> str:
    return f"{PREFIX}: {variant}: {phase}"


def split_create(create_ms: float, phases: dict[str, float]) -> dict[str, float]:
    """The VM's phases plus the service's share of ``create_ms`` (never below 0)."""
    rows = dict(phases)
    rows[SERVICE] = max(0.0, create_ms - sum(phases.values()))
    return rows


def handle_phases(
    manager: SandboxManager, sandbox_id: str
) -> tuple[dict[str, float], dict[str, float]]:
    """The phases recorded on the sandbox ``manager`` holds (none for a driver that
    records none), and those of its making ahead of the create (a pooled VM's)."""
    handle: Any = manager._core.live.get(sandbox_id)
    found, ahead = phases_of(handle), phases_of(_Ahead(handle))
    return (
        found.as_dict() if found is not None else {},
        ahead.as_dict() if ahead is not None else {},
    )


class _Ahead:
    """A handle's ``prepared_phases`` seen as ``phases``."""

    def __init__(self, handle: object) -> None:
        self.phases = getattr(handle, "prepared_phases", None)


async def sample(manager: SandboxManager, variant: str, rows: dict[str, Measurement]) -> None:
    started = time.perf_counter()
    record = await manager.create()
    try:
        create_ms = ms_since(started)
        during, ahead = handle_phases(manager, record.id)
        split = split_create(create_ms, during)
        before_exec = time.perf_counter()
        result = await manager.exec(record.id, TRUE)
        split[FIRST_EXEC] = ms_since(before_exec)
        split[TOTAL] = ms_since(started)
        if result.exit_code != 0:
            raise RuntimeError(f"`true` exited {result.exit_code} in sandbox {record.id}")
    finally:
        await manager.kill(record.id)
    for label, phases in ((variant, split), (f"{variant} {AHEAD}", ahead)):
        for phase, ms in phases.items():
            name = row_name(label, phase)
            rows.setdefault(name, Measurement(name)).samples.append(ms)


async def phase_breakdown(variants: list[Variant], rounds: int, report: Report) -> None:
    """``rounds`` samples of each variant that has a manager, interleaved."""
    ready = [v for v in variants if v.manager is not None]
    if not ready:
        raise RuntimeError("no create path to measure")
    pool = next((v for v in ready if v.settings.pool_size > 0), None)
    rows: dict[str, Measurement] = {}
    rtt = Measurement(EXEC_RTT)
    host = ready[0].get()
    long_lived = await host.create()
    try:
        for i in range(rounds):
            progress(f"phase breakdown: round {i + 1}/{rounds}")
            for v in ready:
                await wait_pool_full(pool)
                await wait_spares(ready)
                await sample(v.get(), v.name, rows)
            await wait_pool_full(pool)
            await wait_spares(ready)
            started = time.perf_counter()
            await host.exec(long_lived.id, TRUE)
            rtt.samples.append(ms_since(started))
    finally:
        await host.kill(long_lived.id)
    for m in rows.values():
        report.add(m)
    if EXEC_RTT not in report.measurements:
        report.add(rtt)


def phase_table(measurements: dict[str, dict[str, Any]]) -> str:
    """A Markdown table, one row per phase and one column per variant (p50 ms), from
    the ``measurements`` of a results JSON."""
    variants: list[str] = []
    phases: list[str] = []
    cells: dict[tuple[str, str], float] = {}
    for name, summary in measurements.items():
        parts = name.split(": ", 2)
        if len(parts) != 3 or parts[0] != PREFIX or "p50_ms" not in summary:
            continue
        _, variant, phase = parts
        if variant not in variants:
            variants.append(variant)
        if phase not in phases:
            phases.append(phase)
        cells[variant, phase] = float(summary["p50_ms"])
    if not variants:
        return ""
    # The total last, whatever order the samples came in.
    phases.sort(key=lambda p: p == TOTAL)
    lines = [
        "| phase (p50 ms) | " + " | ".join(variants) + " |",
        "|---|" + "---:|" * len(variants),
    ]
    for phase in phases:
        values = [cells.get((v, phase)) for v in variants]
        shown = ["" if x is None else f"{x:.1f}" for x in values]
        lines.append(f"| {phase} | " + " | ".join(shown) + " |")
    return "\n".join(lines)
