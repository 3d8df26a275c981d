"""Host load during a hostile case, sampled from /proc, and the report table it goes to.

A :class:`Sampler` thread reads MemAvailable, the load average, the RSS and CPU time of
the VMM processes under a data dir and the server's RSS every ``interval_s``; the
:class:`Report` appends one markdown row per case to ``EMBERBOX_HOSTILE_REPORT``.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.paths import qemu_pids_under

PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")
MIB = 1 << 20
COLUMNS = (
    "case",
    "contained by",
    "outcome",
    "s",
    "MemAvailable min MiB",
    "QEMU RSS max MiB",
    "QEMU CPU s",
    "server RSS max MiB",
    "server CPU s",
    "load1 max",
)


def mem_available_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def rss_and_cpu(pid: int) -> tuple[int, float]:
    """(RSS bytes, user+system CPU seconds) of a live process; (0, 0) once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0, 0.0
    # After the command name: state is field 3, utime 14, stime 15, rss 24 (1-based).
    return int(fields[21]) * PAGE, (int(fields[11]) + int(fields[12])) / TICKS


@dataclass
class Sampler:
    """Samples the host until stopped; read the extremes afterwards."""

    data_dir: Path
    server_pid: int
    interval_s: float = 0.25
    mem_min_mib: int = 1 << 30
    qemu_rss_max: int = 0
    server_rss_max: int = 0
    server_cpu: tuple[float, float] | None = None  # (first, last) CPU seconds seen
    load_max: float = 0.0
    _cpu: dict[int, float] = field(default_factory=dict)  # per VMM pid: last CPU time seen
    _cpu0: dict[int, float] = field(default_factory=dict)  # ... and the first
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    started: float = 0.0
    elapsed_s: float = 0.0

    def __enter__(self) -> Sampler:
        self.started = time.monotonic()
        self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(5)
        self.sample()
        self.elapsed_s = time.monotonic() - self.started

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        self.mem_min_mib = min(self.mem_min_mib, mem_available_mib())
        self.load_max = max(self.load_max, os.getloadavg()[0])
        server_rss, server_cpu = rss_and_cpu(self.server_pid)
        self.server_rss_max = max(self.server_rss_max, server_rss)
        if server_rss:
            first = self.server_cpu[0] if self.server_cpu else server_cpu
            self.server_cpu = (min(first, server_cpu), server_cpu)  # a restart starts at 0
        rss_total = 0
        for pid in qemu_pids_under(self.data_dir):
            rss, cpu = rss_and_cpu(pid)
            rss_total += rss
            if rss:
                self._cpu0.setdefault(pid, cpu)
                self._cpu[pid] = cpu
        self.qemu_rss_max = max(self.qemu_rss_max, rss_total)

    @property
    def qemu_cpu_s(self) -> float:
        """CPU time the VMMs used while sampled (a VMM that died keeps its last sample)."""
        return sum(self._cpu[pid] - self._cpu0[pid] for pid in self._cpu)


class Report:
    """The markdown table of the hostile suite, one row per case."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        header = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
        path.write_text("# emberbox hostile suite: containment and host load\n\n" + header)

    def add(self, case: str, contained_by: str, outcome: str, sampler: Sampler) -> None:
        cells = [
            case,
            contained_by,
            outcome.replace("|", "/").replace("\n", " "),
            f"{sampler.elapsed_s:.1f}",
            str(sampler.mem_min_mib),
            f"{sampler.qemu_rss_max / MIB:.0f}",
            f"{sampler.qemu_cpu_s:.1f}",
            f"{sampler.server_rss_max / MIB:.0f}",
            f"{sampler.server_cpu[1] - sampler.server_cpu[0]:.2f}" if sampler.server_cpu else "-",
            f"{sampler.load_max:.2f}",
        ]
        with self.path.open("a") as out:
            out.write("| " + " | ".join(cells) + " |\n")
