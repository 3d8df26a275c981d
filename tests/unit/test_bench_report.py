"""The bench's pure parts: the start's timing points, the phase table, --compare."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.compare import compare_docs, compare_files, compare_table, numeric_keys
from bench.memory import KIB_PER_MIB, VMMemory, fit_in_budget, fit_shared_once
from bench.phases import FIRST_EXEC, SERVICE, TOTAL, phase_table, row_name, split_create
from emberbox.vmm.phases import Phases, phases_of


def test_phases_add_up_in_order_and_time_a_failing_block() -> None:
    phases = Phases()
    phases.add("disk overlay", 2.0)
    phases.add("QEMU spawn", 1.0)
    phases.add("disk overlay", 0.5)
    with pytest.raises(RuntimeError), phases.timed("agent hello"):
        raise RuntimeError("boom")
    assert list(phases.as_dict()) == ["disk overlay", "QEMU spawn", "agent hello"]
    assert phases.as_dict()["disk overlay"] == 2.5
    assert phases.as_dict()["agent hello"] >= 0.0
    other = Phases()
    other.add("QEMU spawn", 1.0)
    phases.merge(other)
    phases.merge(None)
    assert phases.as_dict()["QEMU spawn"] == 2.0
    assert phases.total_ms() == pytest.approx(sum(phases.as_dict().values()))


def test_phases_of_finds_only_real_phases() -> None:
    class WithPhases:
        phases = Phases()

    class WithOther:
        phases = {"a": 1.0}

    assert phases_of(WithPhases()) is WithPhases.phases
    assert phases_of(WithOther()) is None and phases_of(object()) is None


def test_the_service_gets_what_the_vm_phases_do_not_explain() -> None:
    assert split_create(50.0, {"QMP connect": 30.0, "agent hello": 15.0}) == {
        "QMP connect": 30.0,
        "agent hello": 15.0,
        SERVICE: 5.0,
    }
    # Never negative (a pooled VM's phases can outlast the create's own clock).
    assert split_create(4.0, {"hand-out hello": 5.0})[SERVICE] == 0.0


def test_phase_table_has_a_column_per_variant_and_the_total_last() -> None:
    def row(p50: float) -> dict[str, float]:
        return {"p50_ms": p50, "p90_ms": p50, "n": 3}

    measurements = {
        row_name("snapshot restore", TOTAL): row(300.0),
        row_name("snapshot restore", "agent hello"): row(95.8),
        row_name("warm pool", "hand-out hello"): row(5.0),
        row_name("warm pool", TOTAL): row(45.9),
        row_name("snapshot restore", FIRST_EXEC): row(136.2),
        "create -> first exec: warm pool": row(50.0),  # not a phase row
    }
    lines = phase_table(measurements).splitlines()
    assert lines[0] == "| phase (p50 ms) | snapshot restore | warm pool |"
    assert lines[2] == "| agent hello | 95.8 |  |"
    assert lines[3] == "| hand-out hello |  | 5.0 |"
    assert lines[-1] == f"| {TOTAL} | 300.0 | 45.9 |"
    assert phase_table({"create -> first exec: x": row(1.0)}) == ""


def test_numeric_keys_are_dotted_paths_and_skip_booleans() -> None:
    doc = {
        "measurements": {"exec": {"p50_ms": 30.1, "n": 5}},
        "restore_over_cold": 0.068,
        "acceptance": {"restore_over_cold": {"value": 0.068, "limit": 0.1, "ok": True}},
        "notes": {"cpus": 2, "qemu": "7.2"},
    }
    assert numeric_keys(doc) == {
        "measurements.exec.p50_ms": 30.1,
        "measurements.exec.n": 5.0,
        "restore_over_cold": 0.068,
        "acceptance.restore_over_cold.value": 0.068,
        "acceptance.restore_over_cold.limit": 0.1,
        "notes.cpus": 2.0,
    }


def test_compare_lists_every_key_of_either_side() -> None:
    before = {"a": 2.0, "b": {"c": 4}}
    after = {"b": {"c": 2}, "d": 1}
    assert compare_docs(before, after) == [("a", 2.0, None), ("b.c", 4.0, 2.0), ("d", None, 1.0)]
    lines = compare_table(before, after).splitlines()
    assert lines[0].split() == ["key", "before", "after", "after/before"]
    assert lines[1].split() == ["a", "2", "-"]
    assert lines[2].split() == ["b.c", "4", "2", "0.50x"]
    assert lines[3].split() == ["d", "-", "1"]


def test_compare_files_labels_columns_with_the_file_names(tmp_path: Path) -> None:
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps({"pool_over_exec_rtt": 1.73}))
    new.write_text(json.dumps({"pool_over_exec_rtt": 1.5}))
    lines = compare_files(old, new).splitlines()
    assert lines[0].split() == ["key", "old.json", "new.json", "after/before"]
    assert lines[1].split() == ["pool_over_exec_rtt", "1.73", "1.5", "0.87x"]


def test_density_counts_shared_pages_once() -> None:
    """Two clones, each 10 MiB private and 30 MiB shared (PSS 25 MiB each when both
    map it): the old estimate charges each its PSS share, the new one only its USS."""
    mib = KIB_PER_MIB
    vm = VMMemory(
        pss=35 * mib,  # 10 private + 50/2 shared
        guest_rss=20 * mib,
        guest_pss=12 * mib,
        guest_private=2 * mib,
        tcg_buffer=0,
        private=10 * mib,
    )
    assert fit_shared_once([vm, vm], budget_mib=1000) == (1000 - 50) // 10
    fit, shared = fit_in_budget([vm, vm], budget_mib=1000)
    assert shared == 20.0  # template pages only: 2 x (12 - 2)
    assert fit == ((1000 - 20) // (23 + 2))  # overhead 35 - 12, plus 2 private
