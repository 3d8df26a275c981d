"""Host memory of idle sandboxes, from ``/proc/PID/smaps``.

Guest RAM is one mapping of the VMM whose size is the guest's memory (anonymous for a
cold-booted VM; the template's RAM file, mapped copy-on-write, for a clone). Its RSS is
the guest memory actually touched; its private pages are this sandbox's alone, the rest
are template pages shared by every clone. The VMM's overhead is its PSS minus that
mapping's PSS: QEMU itself, its heap, and under TCG the translation cache.

How many idle sandboxes fit in 24 GiB: (24 GiB - the shared template pages, counted
once) / (overhead + private guest memory) per sandbox. Summing the guest mappings' PSS
over all clones counts each shared page exactly once, as long as nothing else maps them.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import anyio

from bench.harness import TRUE, Variant, progress
from bench.stats import Measurement, Report

KIB_PER_MIB = 1024
HOST_BUDGET_MIB = 24 * 1024
SETTLE_S = 5.0
_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \S+\s*(.*)$")


@dataclass
class Mapping:
    start: int
    end: int
    perms: str
    path: str
    fields_kib: dict[str, int]

    @property
    def size_kib(self) -> int:
        return (self.end - self.start) // 1024

    def kib(self, name: str) -> int:
        return self.fields_kib.get(name, 0)

    @property
    def private_kib(self) -> int:
        return self.kib("Private_Clean") + self.kib("Private_Dirty")


def parse_smaps(text: str) -> list[Mapping]:
    """The mappings of a ``/proc/PID/smaps`` text with their ``kB`` fields."""
    mappings: list[Mapping] = []
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            start, end = int(header[1], 16), int(header[2], 16)
            mappings.append(Mapping(start, end, header[3], header[4], {}))
        elif mappings and line.endswith(" kB"):
            key, _, value = line.partition(":")
            mappings[-1].fields_kib[key] = int(value.split()[0])
    return mappings


def guest_ram(mappings: list[Mapping], memory_mib: int) -> Mapping:
    """The guest RAM mapping: writable, not executable (that is TCG's code buffer), of
    exactly the guest's size; the most resident one if several qualify."""
    size_kib = memory_mib * KIB_PER_MIB
    candidates = [
        m for m in mappings if m.size_kib == size_kib and "w" in m.perms and "x" not in m.perms
    ]
    if not candidates:
        raise LookupError(f"no {memory_mib} MiB writable mapping in the VMM's smaps")
    return max(candidates, key=lambda m: m.kib("Rss"))


def tcg_code_buffer_kib(mappings: list[Mapping]) -> int:
    """RSS of QEMU's TCG translation cache (an anonymous rwx mapping of up to 1 GiB)."""
    return sum(
        m.kib("Rss") for m in mappings if "x" in m.perms and not m.path and m.size_kib >= 1 << 17
    )


@dataclass(frozen=True)
class VMMemory:
    """One VMM's memory, in KiB."""

    pss: int
    guest_rss: int  # guest memory touched
    guest_pss: int
    guest_private: int
    tcg_buffer: int
    private: int = 0  # all of its private pages (USS), guest RAM included

    @property
    def overhead(self) -> int:
        return self.pss - self.guest_pss


def vm_memory(pid: int, memory_mib: int) -> VMMemory:
    mappings = parse_smaps(Path(f"/proc/{pid}/smaps").read_text())
    guest = guest_ram(mappings, memory_mib)
    return VMMemory(
        pss=sum(m.kib("Pss") for m in mappings),
        guest_rss=guest.kib("Rss"),
        guest_pss=guest.kib("Pss"),
        guest_private=guest.private_kib,
        tcg_buffer=tcg_code_buffer_kib(mappings),
        private=sum(m.private_kib for m in mappings),
    )


def fit_in_budget(vms: list[VMMemory], budget_mib: int = HOST_BUDGET_MIB) -> tuple[int, float]:
    """(how many idle sandboxes fit in ``budget_mib``, shared guest MiB counted once)."""
    shared_mib = sum(vm.guest_pss - vm.guest_private for vm in vms) / KIB_PER_MIB
    per_vm_mib = statistics.fmean(vm.overhead + vm.guest_private for vm in vms) / KIB_PER_MIB
    return int((budget_mib - shared_mib) // per_vm_mib), shared_mib


def fit_shared_once(vms: list[VMMemory], budget_mib: int = HOST_BUDGET_MIB) -> int:
    """Like :func:`fit_in_budget`, with every shared page counted once, not only the
    template's: QEMU's binary and libraries too. Each sandbox costs its private pages
    (USS); the rest of its PSS is pages it shares, counted once for all. With a handful
    of sandboxes, PSS charges each a big share of QEMU's code that hundreds would split:
    this is what N sandboxes cost when N is large."""
    shared_mib = sum(vm.pss - vm.private for vm in vms) / KIB_PER_MIB
    per_vm_mib = statistics.fmean(vm.private for vm in vms) / KIB_PER_MIB
    return int((budget_mib - shared_mib) // per_vm_mib)


async def idle_vms(variant: Variant, count: int) -> list[VMMemory]:
    """Start ``count`` sandboxes, let them go idle, read their VMMs' smaps, kill them."""
    manager = variant.get()
    ids: list[str] = []
    try:
        records = []
        for _ in range(count):
            record = await manager.create()
            ids.append(record.id)
            await manager.exec(record.id, TRUE)
            records.append(record)
        await anyio.sleep(SETTLE_S)
        return [vm_memory(r.vmm_pid, r.memory_mib) for r in records if r.vmm_pid is not None]
    finally:
        for sandbox_id in ids:
            await manager.kill(sandbox_id)


def add_memory_rows(label: str, vms: list[VMMemory], report: Report) -> int:
    """Rows for one kind of sandbox; returns how many fit in 24 GiB."""
    rows = {
        f"idle VMM overhead (PSS - guest RAM): {label}": [vm.overhead for vm in vms],
        f"idle VMM private pages (USS): {label}": [vm.private for vm in vms],
        f"idle guest RAM touched (RSS): {label}": [vm.guest_rss for vm in vms],
        f"idle guest RAM private: {label}": [vm.guest_private for vm in vms],
        f"idle TCG translation cache (RSS): {label}": [vm.tcg_buffer for vm in vms],
    }
    for name, kib in rows.items():
        report.add(Measurement(name, [k / KIB_PER_MIB for k in kib], unit="mib"))
    fit, shared_mib = fit_in_budget(vms)
    report.notes[f"guest RAM shared between {label}s, counted once (MiB)"] = round(shared_mib, 1)
    return fit


async def idle_memory(template: Variant, cold: Variant, count: int, report: Report) -> None:
    for variant, label, key in (
        (template, "template clone", "idle_sandboxes_in_24gib"),
        (cold, "cold boot", "idle_cold_sandboxes_in_24gib"),
    ):
        if variant.manager is None:
            report.skip(f"idle memory: {label}", variant.unavailable or "unavailable")
            continue
        progress(f"idle memory: {count} sandboxes ({label})")
        vms = await idle_vms(variant, count)
        report.number(key, add_memory_rows(label, vms, report))
        report.number(f"{key}_shared_once", fit_shared_once(vms))
