"""``--compare OLD.json``: two bench results side by side, every numeric key.

Numbers are found anywhere in the JSON (``measurements.<row>.p50_ms``, ``sizes...``,
the top-level ratios, ``acceptance.<name>.value``...) and named by their dotted path.
A key only one side has shows ``-`` on the other. Booleans are not numbers here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

KEY_WIDTH = 72


def numeric_keys(doc: Any, prefix: str = "") -> dict[str, float]:
    """Every number in ``doc`` by its dotted path, in document order."""
    found: dict[str, float] = {}
    if isinstance(doc, dict):
        for key, value in doc.items():
            found.update(numeric_keys(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(doc, (int, float)) and not isinstance(doc, bool):
        found[prefix] = float(doc)
    return found


def compare_docs(before: Any, after: Any) -> list[tuple[str, float | None, float | None]]:
    """(key, before, after) for every numeric key of either, ``before``'s order first."""
    old, new = numeric_keys(before), numeric_keys(after)
    keys = list(old) + [k for k in new if k not in old]
    return [(k, old.get(k), new.get(k)) for k in keys]


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}".rstrip("0").rstrip(".")


def compare_table(before: Any, after: Any, labels: tuple[str, str] = ("before", "after")) -> str:
    """The side-by-side table: key, before, after, after/before (when both are non-zero)."""
    w = KEY_WIDTH
    lines = [f"{'key':<{w}} {labels[0]:>12} {labels[1]:>12} {'after/before':>12}"]
    for key, old, new in compare_docs(before, after):
        ratio = f"{new / old:.2f}x" if old and new is not None else ""
        shown = key if len(key) <= w else "..." + key[-(w - 3) :]
        lines.append(f"{shown:<{w}} {_cell(old):>12} {_cell(new):>12} {ratio:>12}")
    return "\n".join(lines)


def compare_files(before: Path, after: Path) -> str:
    """The table for two results files (labelled with their names)."""
    docs = [json.loads(path.read_text()) for path in (before, after)]
    return compare_table(docs[0], docs[1], (before.name[:12], after.name[:12]))
