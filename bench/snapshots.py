"""Snapshot save time and size vs guest memory size.

One cold-booted sandbox per memory size (so its RAM is its own, not a template's), idle
after one exec; ``SandboxManager.snapshot`` is timed a few times on it, each snapshot
deleted again. The guest RAM it has touched is read just before, since the saved state
holds touched pages only (QEMU sends untouched, zero pages as flags).
"""

from __future__ import annotations

import time

from bench.harness import (
    TRUE,
    MissingAPI,
    Skip,
    Variant,
    ms_since,
    progress,
    require_methods,
)
from bench.memory import KIB_PER_MIB, vm_memory
from bench.stats import Measurement, Report
from emberbox.service.sandboxes.manager import SandboxManager


def save_name(memory_mib: int) -> str:
    return f"snapshot save: {memory_mib} MiB guest"


async def snapshot_one_size(
    manager: SandboxManager, memory_mib: int, runs: int, report: Report
) -> None:
    save = Measurement(save_name(memory_mib))
    size = Measurement(f"snapshot size: {memory_mib} MiB guest", unit="mib")
    touched = Measurement(f"guest RAM touched at snapshot: {memory_mib} MiB guest", unit="mib")
    record = await manager.create(memory_mib=memory_mib)
    try:
        await manager.exec(record.id, TRUE)
        for _ in range(runs):
            if record.vmm_pid is not None:
                mem = vm_memory(record.vmm_pid, memory_mib)
                touched.samples.append(mem.guest_rss / KIB_PER_MIB)
            started = time.perf_counter()
            snap = await manager.snapshot(record.id)
            save.samples.append(ms_since(started))
            size.samples.append(snap.size_bytes / (1 << 20))
            await manager.delete_snapshot(snap.id)
    finally:
        await manager.kill(record.id)
        for m in (save, size, touched):
            report.add(m)


async def snapshot_sizes(cold: Variant, sizes: list[int], runs: int, report: Report) -> None:
    try:
        manager = cold.get()
        require_methods(manager, "snapshot", "delete_snapshot")
    except (MissingAPI, Skip) as exc:
        why = f"missing {exc}" if isinstance(exc, MissingAPI) else str(exc)
        for memory_mib in sizes:
            report.skip(save_name(memory_mib), why)
        return
    for memory_mib in sizes:
        progress(f"snapshot: {memory_mib} MiB guest, {runs} saves")
        await snapshot_one_size(manager, memory_mib, runs, report)
