"""Sandbox rows and the exec log: typed round trips, compare-and-set, filters and
concurrency."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta
from pathlib import Path

import anyio
import pytest

from emberbox import errors
from emberbox.service.sandboxes.state import SandboxState, check_transition
from emberbox.store import ExecLogEntry, SandboxRow, Store, utcnow
from tests.support.rows import make_row

pytestmark = pytest.mark.anyio


async def test_roundtrip_keeps_types(store: Store) -> None:
    """A row comes back equal: aware UTC datetimes, dicts, paths, None."""
    row = make_row()
    assert await store.insert(row) == row
    got = await store.get("sb1")
    assert got == row
    assert got is not None and got.created_at.tzinfo is not None


async def test_naive_datetime_is_refused(store: Store) -> None:
    """Naive datetimes never reach the database."""
    with pytest.raises(ValueError, match="naive"):
        await store.insert(make_row(created_at=datetime(2020, 1, 1)))


async def test_duplicate_id_is_conflict(store: Store) -> None:
    """Inserting an existing id raises Conflict."""
    await store.insert(make_row())
    with pytest.raises(errors.Conflict, match="already exists"):
        await store.insert(make_row())


async def test_get_unknown_is_none(store: Store) -> None:
    """get() of an unknown id answers None."""
    assert await store.get("nope") is None


async def test_update_changes_fields_and_updated_at(store: Store) -> None:
    """update() sets the given columns and bumps updated_at; unknown ids are NotFound."""
    await store.insert(make_row())
    got = await store.update("sb1", vmm_pid=42, error="boom", work_dir=Path("/x"))
    assert (got.vmm_pid, got.error, got.work_dir) == (42, "boom", Path("/x"))
    assert got.updated_at > make_row().updated_at
    with pytest.raises(errors.NotFound):
        await store.update("nope", error="x")


async def test_transition_is_compare_and_set(store: Store) -> None:
    """transition() moves only from the expected states and sets fields with it."""
    await store.insert(make_row())
    got = await store.transition("sb1", {"creating"}, "running", vmm_pid=7)
    assert (got.state, got.vmm_pid) == ("running", 7)
    with pytest.raises(errors.Conflict) as caught:
        await store.transition("sb1", {"creating"}, "error", error="x")
    assert str(caught.value) == "sandbox sb1 is running; cannot move to error"
    assert (await store.get("sb1")) == got  # the failed CAS changed nothing
    with pytest.raises(errors.NotFound):
        await store.transition("nope", {"creating"}, "running")


async def test_transition_message_matches_state_machine(store: Store) -> None:
    """A lost race in the store is worded exactly like an illegal move."""
    await store.insert(make_row(state="stopped"))
    with pytest.raises(errors.Conflict) as from_store:
        await store.transition("sb1", {SandboxState.STOPPING}, SandboxState.RUNNING)
    with pytest.raises(errors.Conflict) as from_machine:
        check_transition(SandboxState.STOPPED, SandboxState.RUNNING, sandbox_id="sb1")
    assert str(from_store.value) == str(from_machine.value)


async def test_concurrent_transitions_have_one_winner(store: Store) -> None:
    """Of twenty tasks racing one CAS, exactly one wins and the rest get Conflict."""
    await store.insert(make_row())
    outcomes: list[str] = []

    async def race(n: int) -> None:
        try:
            await store.transition("sb1", {"creating"}, "running", vmm_pid=n)
            outcomes.append("won")
        except errors.Conflict:
            outcomes.append("lost")

    async with anyio.create_task_group() as tg:
        for n in range(20):
            tg.start_soon(race, n)
    assert sorted(outcomes) == ["lost"] * 19 + ["won"]


async def test_concurrent_inserts_from_many_tasks(store: Store) -> None:
    """Fifty tasks inserting and logging at once all land."""

    async def work(n: int) -> None:
        await store.insert(make_row(f"sb{n}"))
        await store.log_exec(
            ExecLogEntry(sandbox_id=f"sb{n}", command=["true"], started_at=utcnow(), duration_ms=1)
        )

    async with anyio.create_task_group() as tg:
        for n in range(50):
            tg.start_soon(work, n)
    assert await store.count() == 50
    assert len(await store.exec_log("sb7")) == 1


async def test_list_filters_by_state_metadata_and_expiry(store: Store) -> None:
    """list() filters by states, every metadata pair, and expires_before."""
    base = make_row().created_at
    await store.insert(make_row("a", state="running", metadata={"team": "x", "env": "prod"}))
    await store.insert(make_row("b", state="running", metadata={"team": "y"}))
    await store.insert(
        make_row("c", state="stopped", metadata={"team": "x"}, expires_at=base - timedelta(1))
    )

    def ids(rows: list[SandboxRow]) -> list[str]:
        return [r.id for r in rows]

    assert ids(await store.list()) == ["a", "b", "c"]
    assert ids(await store.list(states={"running"})) == ["a", "b"]
    assert ids(await store.list(states=[])) == []
    assert ids(await store.list(metadata={"team": "x"})) == ["a", "c"]
    assert ids(await store.list(metadata={"team": "x", "env": "prod"})) == ["a"]
    assert ids(await store.list(metadata={"team": "x"}, states={"stopped"})) == ["c"]
    assert ids(await store.list(metadata={"team": "z"})) == []
    assert ids(await store.list(expires_before=base)) == ["c"]
    assert await store.count(states={"running", "creating"}) == 2


async def test_metadata_filter_takes_any_key(store: Store) -> None:
    """Metadata keys with dots, quotes and dollar signs match literally."""
    odd = {'a.b"$[0]': "v", "k": "1"}
    await store.insert(make_row(metadata=odd))
    assert len(await store.list(metadata={'a.b"$[0]': "v"})) == 1
    assert await store.list(metadata={"a": "v"}) == []


async def test_exec_log_roundtrip_and_cascade(store: Store) -> None:
    """Exec log entries come back typed, and go with their sandbox on delete."""
    await store.insert(make_row())
    when = utcnow()
    logged = await store.log_exec(
        ExecLogEntry(
            sandbox_id="sb1", command="echo hi", started_at=when, duration_ms=2.5, exit_code=0
        )
    )
    assert logged.id is not None
    await store.log_exec(
        ExecLogEntry(
            sandbox_id="sb1", command=["sleep", "9"], started_at=when, duration_ms=9, timed_out=True
        )
    )
    entries = await store.exec_log("sb1")
    assert [e.command for e in entries] == ["echo hi", ["sleep", "9"]]
    assert entries[1].timed_out and entries[1].exit_code is None
    assert entries[0].started_at == when
    assert await store.delete("sb1") is True
    assert await store.exec_log("sb1") == []
    assert await store.delete("sb1") is False


async def test_exec_log_needs_an_existing_sandbox(store: Store) -> None:
    """The foreign key refuses exec log lines for unknown sandboxes."""
    with pytest.raises(sqlite3.IntegrityError):
        await store.log_exec(
            ExecLogEntry(sandbox_id="ghost", command=["x"], started_at=utcnow(), duration_ms=0)
        )


async def test_close_is_idempotent_and_final(db_path: Path) -> None:
    """close() twice is fine; calls after close raise instead of touching a closed handle."""
    store = await Store.open(db_path)
    await store.close()
    await store.close()
    assert store.closed
    with pytest.raises(errors.EmberboxError, match="closed"):
        await store.get("x")
