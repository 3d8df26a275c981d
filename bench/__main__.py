"""`make bench`: measure emberbox side by side on this machine and print a table.

Writes bench/results/latest.json: p50/p90 and sample count per measurement (times in
``measurements``, in ms; memory and file sizes in ``sizes``, in MiB), the ratios of
issue 4's acceptance criteria and the other headline numbers as top-level keys, the
verdicts in ``acceptance``, and what could not run (and why) in ``skipped``. Numbers,
not asserts: these machines are noisy. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable
from pathlib import Path

from bench import (
    compare,
    create,
    e2b,
    exec_rtt,
    firecracker_rows,
    memory,
    oneshot,
    phases,
    ports,
    snapshots,
)
from bench.harness import MissingAPI, Skip, Variant, foreign_vmms, open_variant, progress, sweep
from bench.stats import Report
from emberbox.config import Settings

RESULTS = Path(__file__).parent / "results"
SECTIONS = (
    "exec", "create", "phases", "oneshot", "memory", "snapshot", "e2b", "ports", "firecracker"
)  # fmt: skip
WALL_LIMIT_S = 15 * 60


class Run:
    """One bench run: its report, and whether a section failed outright."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.report = Report()
        self.failed = False
        self.foreign_vmms = 0

    async def section(self, name: str, work: Awaitable[None]) -> None:
        progress(f"== {name}")
        self.look_around()
        try:
            await work
        except MissingAPI as exc:
            self.report.skip(name, f"missing {exc}")
        except Skip as exc:
            self.report.skip(name, str(exc))
        except Exception as exc:
            traceback.print_exc()
            self.report.skip(name, f"failed: {type(exc).__name__}: {exc}"[:200])
            self.failed = True
        self.look_around()

    def look_around(self) -> None:
        """Note other VMMs on this host (they make the numbers noisy), warn once."""
        seen = foreign_vmms(self.root)
        if seen and not self.foreign_vmms:
            progress(f"WARNING: other VMMs are running ({', '.join(seen[:4])}): numbers are noisy")
        self.foreign_vmms = max(self.foreign_vmms, len(seen))
        self.report.notes["other VMMs running meanwhile (max seen)"] = self.foreign_vmms


# Which sections use which create path's manager (a manager is opened only if needed).
NEEDS = {
    "cold boot": {"create", "memory", "snapshot"},
    "snapshot restore": {"create", "phases", "memory"},
    "warm pool": {"create", "phases", "oneshot"},
}


async def variant(stack: contextlib.AsyncExitStack, name: str, run: Run, only: set[str]) -> Variant:
    if not NEEDS[name] & only:
        return Variant(name, Settings(data_dir=run.root / "unused"), unavailable="not selected")
    opened = await open_variant(stack, name, run.root)
    run.failed |= opened.broken
    return opened


async def measure(args: argparse.Namespace, root: Path, run: Run) -> None:
    report, only = run.report, set(args.only)
    if "exec" in only:
        await run.section("exec round trip", exec_rtt.exec_round_trip(root, args.execs, report))
    if "ports" in only:
        work = ports.ports_proxy(root, min(args.execs, 10), report)
        await run.section("ports proxy", work)
    if "e2b" in only:
        work = e2b.e2b_front(root, args.samples, args.execs, report)
        await run.section("e2b front", work)
    if "firecracker" in only:
        await run.section("firecracker", firecracker_rows.firecracker(args.quick, report))
    async with contextlib.AsyncExitStack() as managers:
        cold = await variant(managers, "cold boot", run, only)
        restore = await variant(managers, "snapshot restore", run, only)
        async with contextlib.AsyncExitStack() as pool_stack:
            # The pool's idle VMs would skew the memory figures: closed before those.
            pool = await variant(pool_stack, "warm pool", run, only)
            if accel := cold.accel or restore.accel or pool.accel:
                report.notes["accel"] = accel
            if "create" in only:
                work = create.create_to_first_exec([cold, restore, pool], args.samples, report)
                await run.section("create -> first exec", work)
            if "phases" in only:
                work = phases.phase_breakdown([restore, pool], args.samples, report)
                await run.section("phase breakdown", work)
            if "oneshot" in only:
                await run.section("one-shot", oneshot.one_shot(pool, args.oneshots, report))
        if "memory" in only:
            work = memory.idle_memory(restore, cold, args.idle, report)
            await run.section("idle memory", work)
        if "snapshot" in only:
            work = snapshots.snapshot_sizes(cold, args.snapshot_sizes, args.snapshot_runs, report)
            await run.section("snapshot save", work)


def headline_numbers(report: Report) -> None:
    cold, restore = create.first_exec_name("cold boot"), create.first_exec_name("snapshot restore")
    report.ratio("restore_over_cold", restore, cold)
    report.ratio("pool_over_exec_rtt", create.first_exec_name("warm pool"), create.EXEC_RTT)
    report.ratio("api_exec_vs_agent_client", exec_rtt.API, exec_rtt.DIRECT)
    report.ratio("direct_exec_vs_host_subprocess", exec_rtt.DIRECT, exec_rtt.HOST)
    report.ratio("oneshot_emberbox_over_runsc", oneshot.EMBERBOX, oneshot.RUNSC)
    # Issue 16's goals (issue 4's were 0.1 and 2.0).
    report.check("restore_over_cold", 0.05)
    report.check("pool_over_exec_rtt", 1.5)
    report.check("oneshot_emberbox_over_runsc", 0.5)


def host_notes(report: Report) -> None:
    def first_line(*argv: str) -> str | None:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
            return out.strip().splitlines()[0] if out.strip() else None
        return None

    report.notes.update(
        cpus=os.cpu_count(),
        kernel=platform.release(),
        qemu=first_line("qemu-system-x86_64", "--version"),
        runsc=first_line("runsc", "--version"),
        commit=first_line("git", "describe", "--always", "--dirty"),
        args=" ".join(sys.argv[1:]) or "(defaults)",
    )


async def main(args: argparse.Namespace) -> int:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="eb-bench-", dir="/tmp") as data_dir:
        root = Path(data_dir)
        run = Run(root)
        try:
            await measure(args, root, run)
        finally:
            await sweep(root)
    report = run.report
    headline_numbers(report)
    report.number("wall_time_s", time.monotonic() - started)
    if not args.quick:
        report.check("wall_time_s", WALL_LIMIT_S)
    host_notes(report)
    report.write(args.out)  # first: a closed stdout must not lose the results
    print(report.table())
    if table := phases.phase_table(report.json_measurements()):
        print(f"\nwhere create -> first exec goes:\n{table}")
    print(f"\nwritten to {args.out}")
    if args.compare is not None:
        print(f"\n{compare.compare_files(args.compare, args.out)}")
    return 1 if run.failed else 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    add = parser.add_argument
    add("--quick", action="store_true", help="tiny sample counts: a smoke test (~3 min)")
    add("--samples", type=int, help="create -> first exec rounds (default 20; quick 3)")
    add("--execs", type=int, help="exec round trips per path (default 50; quick 10)")
    add("--oneshots", type=int, help="one-shot print(1) runs per tool (default 20; quick 3)")
    add("--idle", type=int, help="idle sandboxes per kind for memory (default 4; quick 2)")
    add("--snapshot-sizes", type=_sizes, help="guest MiB, comma-separated (default 256,512,1024)")
    add("--snapshot-runs", type=int, help="saves per size (default 3; quick 1)")
    add("--only", type=_sections, default=list(SECTIONS), help=f"subset of {','.join(SECTIONS)}")
    add("--out", type=Path, help="default bench/results/latest.json (quick: quick.json)")
    add("--compare", type=_results, metavar="OLD.json", help="print OLD and this run side by side")
    add("--against", type=_results, metavar="NEW.json", help="with --compare: no run, OLD vs NEW")
    args = parser.parse_args()
    if args.against is not None and args.compare is None:
        parser.error("--against needs --compare OLD.json")
    full = {"samples": 20, "execs": 50, "oneshots": 20, "idle": 4, "snapshot_runs": 3}
    quick = {"samples": 3, "execs": 10, "oneshots": 3, "idle": 2, "snapshot_runs": 1}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.snapshot_sizes is None:
        args.snapshot_sizes = [256] if args.quick else [256, 512, 1024]
    if args.out is None:
        args.out = RESULTS / ("quick.json" if args.quick else "latest.json")
    return args


def _results(text: str) -> Path:
    path = Path(text)
    try:
        json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"{text}: not a readable results JSON ({exc})") from exc
    return path


def _sizes(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def _sections(text: str) -> list[str]:
    chosen = [part for part in text.split(",") if part]
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown sections {sorted(unknown)}; pick from {SECTIONS}"
        )
    return chosen


def entry() -> int:
    args = parse_args()
    if args.against is not None:  # only the comparison: no VM starts
        print(compare.compare_files(args.compare, args.against))
        return 0
    return asyncio.run(main(args))


if __name__ == "__main__":
    sys.exit(entry())
