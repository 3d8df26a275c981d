"""Sample statistics for the benchmarks: p50/p90, ratios, skips, and the results table.

A :class:`Measurement` is a list of samples in one unit: milliseconds for times (they go
to ``measurements`` in the JSON, as ``p50_ms``/``p90_ms``/``n``), MiB for memory and file
sizes (they go to ``sizes``, as ``p50_mib``/``p90_mib``/``n``). Ratios and the other
headline numbers are top-level keys of the JSON.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NAME_WIDTH = 52


@dataclass
class Measurement:
    name: str
    samples: list[float] = field(default_factory=list)
    unit: str = "ms"

    @property
    def samples_ms(self) -> list[float]:  # the name earlier versions used
        return self.samples

    def quantile(self, q: float) -> float:
        ordered = sorted(self.samples)
        if not ordered:
            raise ValueError(f"{self.name}: no samples")
        if len(ordered) == 1:
            return ordered[0]
        return statistics.quantiles(ordered, n=100, method="inclusive")[int(q * 100) - 1]

    def summary(self) -> dict[str, Any]:
        return {
            f"p50_{self.unit}": round(self.quantile(0.5), 3),
            f"p90_{self.unit}": round(self.quantile(0.9), 3),
            "n": len(self.samples),
        }


@dataclass(frozen=True)
class Check:
    """An acceptance criterion of issue 4: ``value <= limit``."""

    value: float
    limit: float

    @property
    def ok(self) -> bool:
        return self.value <= self.limit


@dataclass
class Report:
    measurements: dict[str, Measurement] = field(default_factory=dict)
    numbers: dict[str, float] = field(default_factory=dict)  # ratios and other headlines
    skipped: dict[str, str] = field(default_factory=dict)  # measurement or section -> why
    checks: dict[str, Check] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # whole sections, e.g. "firecracker"

    def add(self, m: Measurement) -> None:
        """Keep ``m`` if it has samples (a section cut short adds what it got)."""
        if m.samples:
            self.measurements[m.name] = m

    def skip(self, name: str, reason: str) -> None:
        self.skipped[name] = reason

    def number(self, name: str, value: float) -> None:
        self.numbers[name] = round(value, 3)

    def ratio(self, name: str, numerator: str, denominator: str) -> float | None:
        """p50(numerator) / p50(denominator); None (and nothing recorded) if either is
        missing, e.g. because its section was skipped."""
        if numerator not in self.measurements or denominator not in self.measurements:
            return None
        value = self.measurements[numerator].quantile(0.5) / self.measurements[
            denominator
        ].quantile(0.5)
        self.number(name, value)
        return value

    def check(self, name: str, limit: float) -> None:
        """Record whether the number ``name`` is at most ``limit`` (if it was measured)."""
        if name in self.numbers:
            self.checks[name] = Check(self.numbers[name], limit)

    def table(self) -> str:
        w = NAME_WIDTH
        lines = [f"{'measurement':<{w}} {'p50':>10} {'p90':>10} {'unit':<4} {'n':>4}"]
        for m in self.measurements.values():
            p50, p90 = m.quantile(0.5), m.quantile(0.9)
            lines.append(f"{m.name:<{w}} {p50:>10.2f} {p90:>10.2f} {m.unit:<4} {len(m.samples):>4}")
        for name, why in self.skipped.items():  # the JSON has the whole reason
            first = why.strip().splitlines()[0] if why.strip() else "?"
            lines.append(f"{name:<{w}} skipped: {first[:160]}")
        lines += [f"{'= ' + k:<{w}} {v:>10.3f}" for k, v in self.numbers.items()]
        for name, c in self.checks.items():
            verdict = "PASS" if c.ok else "FAIL"
            lines.append(f"{'acceptance ' + name:<{w}} {c.value:>10.3f} <= {c.limit:g}  {verdict}")
        lines += [f"{'note ' + k:<{w}} {v}" for k, v in self.notes.items()]
        return "\n".join(lines)

    def json_measurements(self) -> dict[str, dict[str, Any]]:
        """The times as the JSON's ``measurements`` holds them."""
        return {n: m.summary() for n, m in self.measurements.items() if m.unit == "ms"}

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        by_unit = {"ms": "measurements", "mib": "sizes"}
        doc: dict[str, Any] = {"measurements": {}, "sizes": {}}
        for name, m in self.measurements.items():
            doc[by_unit[m.unit]][name] = m.summary()
        doc.update(self.numbers)
        doc["acceptance"] = {
            name: {"value": c.value, "limit": c.limit, "ok": c.ok}
            for name, c in self.checks.items()
        }
        doc.update(self.extra)
        doc["skipped"] = self.skipped
        doc["notes"] = self.notes
        path.write_text(json.dumps(doc, indent=2) + "\n")
