"""Sample statistics for the benchmarks: p50/p90 in milliseconds, and a results table."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Measurement:
    name: str
    samples_ms: list[float] = field(default_factory=list)

    def quantile(self, q: float) -> float:
        ordered = sorted(self.samples_ms)
        if len(ordered) == 1:
            return ordered[0]
        return statistics.quantiles(ordered, n=100, method="inclusive")[int(q * 100) - 1]

    def summary(self) -> dict[str, Any]:
        return {
            "p50_ms": round(self.quantile(0.5), 3),
            "p90_ms": round(self.quantile(0.9), 3),
            "n": len(self.samples_ms),
        }


@dataclass
class Report:
    measurements: dict[str, Measurement] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    def add(self, m: Measurement) -> None:
        self.measurements[m.name] = m

    def ratio(self, name: str, numerator: str, denominator: str) -> float:
        value = self.measurements[numerator].quantile(0.5) / self.measurements[
            denominator
        ].quantile(0.5)
        self.ratios[name] = round(value, 3)
        return value

    def table(self) -> str:
        lines = [f"{'measurement':<44} {'p50 ms':>10} {'p90 ms':>10} {'n':>5}"]
        for m in self.measurements.values():
            s = m.summary()
            lines.append(f"{m.name:<44} {s['p50_ms']:>10.2f} {s['p90_ms']:>10.2f} {s['n']:>5}")
        lines += [f"ratio {k:<38} {v:>10.3f}" for k, v in self.ratios.items()]
        lines += [f"note  {k:<38} {v}" for k, v in self.notes.items()]
        return "\n".join(lines)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "measurements": {k: m.summary() for k, m in self.measurements.items()},
            **self.ratios,
            "notes": self.notes,
        }
        path.write_text(json.dumps(doc, indent=2) + "\n")
