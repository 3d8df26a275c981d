"""The sandbox manager, reaper and reconciler against a fake sandbox (no VMs;
:mod:`tests.support.fakes_sandbox`)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import anyio
import pytest

from emberbox import errors
from emberbox.agent_client.client import ExecResult, ExecSpec, SpawnSpec
from emberbox.config import Settings
from emberbox.service.sandboxes import orphans
from emberbox.service.sandboxes.manager import SandboxManager
from emberbox.service.sandboxes.reaper import VMM_EXITED
from emberbox.service.sandboxes.reconcile import RESTARTED_DURING_BOOT, VMM_GONE
from emberbox.service.sandboxes.state import SandboxState
from emberbox.store import SandboxRow, Store, utcnow
from emberbox.vmm import host
from tests.support.fakes_sandbox import FakeImages, FakeVMM, end_process, spawn_vmm

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        cache_dir=tmp_path / "cache",
        max_sandboxes=3,
        pool_size=0,
        max_vcpus=2,
        max_memory_mib=1024,
        max_timeout_s=600,
        default_exec_timeout_s=30,
        max_exec_timeout_s=120,
        exec_output_max_bytes=4096,
        reaper_interval_s=0.05,
    )


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test spawned; all ended and reaped afterwards."""
    spawned: list[subprocess.Popen[bytes]] = []
    yield spawned
    for proc in spawned:
        end_process(proc)


@pytest.fixture
def vmm(procs: list[subprocess.Popen[bytes]]) -> FakeVMM:
    fake = FakeVMM()
    fake.procs = procs
    return fake


def make_manager(settings: Settings, vmm: FakeVMM) -> SandboxManager:
    return SandboxManager(
        settings,
        sandbox_factory=vmm.start,
        sandbox_attacher=vmm.attach,
        image_registry=FakeImages(),
    )


@pytest.fixture
async def manager(settings: Settings, vmm: FakeVMM) -> AsyncIterator[SandboxManager]:
    async with make_manager(settings, vmm) as opened:
        yield opened


async def seed_rows(settings: Settings, *rows: SandboxRow) -> None:
    """Write rows as an earlier server would have left them."""
    async with await Store.open(settings.db_path) as store:
        for row in rows:
            await store.insert(row)


def stale_row(settings: Settings, sandbox_id: str, state: str, pid: int | None) -> SandboxRow:
    now = utcnow()
    return SandboxRow(
        id=sandbox_id,
        state=state,
        image="default",
        vcpus=1,
        memory_mib=256,
        timeout_s=60,
        created_at=now,
        expires_at=now + timedelta(seconds=60),
        updated_at=now,
        vmm_pid=pid,
        work_dir=settings.vms_dir / sandbox_id,
    )


async def wait_for_state(
    manager: SandboxManager, sandbox_id: str, state: SandboxState, within_s: float = 5.0
) -> None:
    with anyio.fail_after(within_s):
        while (await manager.get(sandbox_id)).state is not state:  # noqa: ASYNC110 (polls the db)
            await anyio.sleep(0.02)


# -- create ---------------------------------------------------------------------------------


async def test_create_boots_detached_and_records_running(
    manager: SandboxManager, vmm: FakeVMM, settings: Settings
) -> None:
    """create() boots a detached sandbox with the defaults and returns it running."""
    record = await manager.create(metadata={"team": "a"}, env={"A": "1"})
    assert record.state is SandboxState.RUNNING
    assert (record.image, record.vcpus, record.memory_mib) == ("default", 1, 512)
    assert record.work_dir == settings.vms_dir / record.id
    assert record.metadata == {"team": "a"} and record.env == {"A": "1"}
    assert record.expires_at > record.created_at
    assert vmm.lifetimes == ["detached"]
    assert await manager.get(record.id) == record


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"vcpus": 0}, "vcpus"),
        ({"vcpus": 3}, "vcpus"),
        ({"vcpus": True}, "vcpus"),
        ({"memory_mib": 63}, "memory_mib"),
        ({"memory_mib": 1025}, "memory_mib"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"timeout_s": 601}, "timeout_s"),
        ({"image": ""}, "image"),
        ({"env": {"A=B": "1"}}, "env"),
        ({"metadata": {"k": 1}}, "metadata"),
    ],
)
async def test_create_rejects_bad_requests_before_booting(
    manager: SandboxManager, vmm: FakeVMM, kwargs: dict[str, object], field: str
) -> None:
    """Out-of-range shape, timeout or malformed env/metadata is InvalidRequest; nothing boots."""
    with pytest.raises(errors.InvalidRequest) as caught:
        await manager.create(**kwargs)  # type: ignore[arg-type]
    assert caught.value.details["field"] == field
    assert vmm.started == {} and await manager.list() == []


async def test_unknown_image_fails_before_booting(manager: SandboxManager, vmm: FakeVMM) -> None:
    """An unknown image raises ImageNotFound naming the available ones; nothing boots."""
    with pytest.raises(errors.ImageNotFound) as caught:
        await manager.create(image="nope")
    assert caught.value.available == ["default", "python"]
    assert vmm.lifetimes == [] and await manager.list() == []


async def test_cap_counts_live_sandboxes(manager: SandboxManager) -> None:
    """The max_sandboxes+1-th live sandbox is refused naming the limit; a kill frees a slot."""
    records = [await manager.create() for _ in range(3)]
    with pytest.raises(errors.QuotaExceeded, match="max_sandboxes=3") as caught:
        await manager.create()
    assert caught.value.details["limit"] == 3
    await manager.kill(records[0].id)
    assert (await manager.create()).state is SandboxState.RUNNING


async def test_boot_failure_records_error_and_leaves_nothing(
    manager: SandboxManager, vmm: FakeVMM, settings: Settings
) -> None:
    """A failed boot re-raises its error, leaves the row in error with the reason, no files."""
    vmm.fail_with = errors.BootTimeout("no handshake within 60s", console_tail="kernel panic")
    with pytest.raises(errors.BootTimeout):
        await manager.create()
    (record,) = await manager.list()
    assert record.state is SandboxState.ERROR
    assert record.error == "boot failed: no handshake within 60s"
    assert not (settings.vms_dir / record.id).exists()
    vmm.fail_with = None
    assert len([await manager.create() for _ in range(3)]) == 3  # error rows are not live


async def test_kill_during_boot_cancels_it(manager: SandboxManager, vmm: FakeVMM) -> None:
    """Killing a creating sandbox cancels its boot; create raises Conflict; row is stopped."""
    vmm.gate = anyio.Event()
    outcome: list[BaseException] = []

    async def create() -> None:
        try:
            await manager.create()
        except errors.Conflict as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(create)
        with anyio.fail_after(5):
            await vmm.booting.wait()
        (record,) = await manager.list(state=SandboxState.CREATING)
        await manager.kill(record.id)
    assert vmm.boot_cancelled
    assert "killed while booting" in str(outcome[0])
    assert (await manager.get(record.id)).state is SandboxState.STOPPED


async def test_cancelled_create_leaves_error_row(manager: SandboxManager, vmm: FakeVMM) -> None:
    """If the caller of create() is cancelled, the boot is cleaned up and the row is error."""
    vmm.gate = anyio.Event()
    with anyio.move_on_after(0.2):
        await manager.create()
    (record,) = await manager.list()
    assert record.state is SandboxState.ERROR
    assert record.error == "creation was cancelled"
    assert vmm.boot_cancelled


async def test_close_during_boot_abandons_it(settings: Settings, vmm: FakeVMM) -> None:
    """Closing the manager mid-boot ends the boot and records the row as error."""
    vmm.gate = anyio.Event()
    manager = make_manager(settings, vmm)
    outcome: list[BaseException] = []

    async def create() -> None:
        try:
            await manager.create()
        except errors.Conflict as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as tg:
        await manager.start()  # start() and close() run in one task, inside this group
        tg.start_soon(create)
        with anyio.fail_after(5):
            await vmm.booting.wait()
        await manager.close()
    assert "server shutting down" in str(outcome[0])
    async with await Store.open(settings.db_path) as store:
        (row,) = await store.list()
    assert (row.state, row.error) == ("error", "server shut down during boot")


# -- queries --------------------------------------------------------------------------------


async def test_get_unknown_is_not_found(manager: SandboxManager) -> None:
    """get(), exec() and kill() of an unknown id raise NotFound."""
    with pytest.raises(errors.NotFound, match="no sandbox ghost"):
        await manager.get("ghost")
    with pytest.raises(errors.NotFound):
        await manager.exec("ghost", ExecSpec(["true"]))
    with pytest.raises(errors.NotFound):
        await manager.kill("ghost")


async def test_list_filters_by_state_and_metadata(manager: SandboxManager) -> None:
    """list() filters by state and by every metadata pair."""
    a = await manager.create(metadata={"team": "a", "tier": "1"})
    b = await manager.create(metadata={"team": "b"})
    await manager.kill(b.id)
    assert [r.id for r in await manager.list()] == [a.id, b.id]
    assert [r.id for r in await manager.list(state=SandboxState.RUNNING)] == [a.id]
    assert [r.id for r in await manager.list(metadata={"team": "b"})] == [b.id]
    assert await manager.list(metadata={"team": "a", "tier": "2"}) == []


async def test_image_names_come_from_the_registry(manager: SandboxManager) -> None:
    """image_names() lists the registry's images."""
    assert await manager.image_names() == ["default", "python"]


async def test_calls_before_start_are_refused(settings: Settings, vmm: FakeVMM) -> None:
    """A manager that was not started refuses work instead of failing obscurely."""
    with pytest.raises(errors.Conflict, match="start"):
        await make_manager(settings, vmm).create()


# -- exec -----------------------------------------------------------------------------------


async def test_exec_merges_env_applies_limits_and_logs(
    manager: SandboxManager, vmm: FakeVMM
) -> None:
    """exec() merges env over the sandbox's, defaults and caps the timeout, logs the call."""
    record = await manager.create(env={"A": "1", "B": "1"})
    result = await manager.exec(record.id, ExecSpec(["echo", "hi"], env={"B": "2"}, cwd="/tmp"))
    assert result.stdout == b"ok\n"
    await manager.exec(record.id, ExecSpec("sleep 1", timeout_s=10_000))
    calls = vmm.started[record.id].exec_calls
    assert calls[0] == {
        "cmd": ["echo", "hi"],
        "env": {"A": "1", "B": "2"},
        "cwd": "/tmp",
        "timeout_s": 30.0,
        "max": 4096,
    }
    assert calls[1]["timeout_s"] == 120.0
    log = await manager.exec_log(record.id)
    assert [(e.command, e.exit_code) for e in log] == [(["echo", "hi"], 0), ("sleep 1", 0)]


@pytest.mark.parametrize(
    ("cmd", "timeout_s"), [([], None), ("", None), (["a\0b"], None), (["true"], 0)]
)
async def test_exec_rejects_bad_input(
    manager: SandboxManager, cmd: list[str] | str, timeout_s: float | None
) -> None:
    """Empty or NUL-bearing commands and non-positive timeouts are InvalidRequest."""
    record = await manager.create()
    with pytest.raises(errors.InvalidRequest):
        await manager.exec(record.id, ExecSpec(cmd, timeout_s=timeout_s))


async def test_exec_on_stopped_is_conflict(manager: SandboxManager) -> None:
    """exec() on a stopped sandbox raises Conflict 'sandbox X is stopped'."""
    record = await manager.create()
    await manager.kill(record.id)
    with pytest.raises(errors.Conflict) as caught:
        await manager.exec(record.id, ExecSpec(["true"]))
    assert str(caught.value) == f"sandbox {record.id} is stopped"


async def test_many_concurrent_execs_in_one_sandbox(manager: SandboxManager, vmm: FakeVMM) -> None:
    """Twenty execs in one sandbox run at once, not one after another."""
    record = await manager.create()
    vmm.started[record.id].exec_delay_s = 0.2
    results: list[ExecResult] = []

    async def run() -> None:
        results.append(await manager.exec(record.id, ExecSpec(["true"])))

    start = time.monotonic()
    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(run)
    assert len(results) == 20
    assert time.monotonic() - start < 2.0


async def test_exec_killed_midway_is_conflict(manager: SandboxManager, vmm: FakeVMM) -> None:
    """An exec whose sandbox is killed under it raises Conflict, not a raw agent error."""
    record = await manager.create()
    vmm.started[record.id].exec_delay_s = 0.3
    raised: list[Exception] = []

    async def run() -> None:
        try:
            await manager.exec(record.id, ExecSpec(["sleep", "5"]))
        except Exception as exc:
            raised.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await anyio.sleep(0.05)
        await manager.kill(record.id)
    assert isinstance(raised[0], errors.Conflict)
    assert str(raised[0]) == f"sandbox {record.id} is stopped"


# -- kill and timeouts ----------------------------------------------------------------------


async def test_kill_is_idempotent_and_concurrency_safe(
    manager: SandboxManager, vmm: FakeVMM, settings: Settings
) -> None:
    """Concurrent and repeated kills end in stopped with the VM killed and its dir gone."""
    record = await manager.create()
    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(manager.kill, record.id)
    await manager.kill(record.id)
    assert (await manager.get(record.id)).state is SandboxState.STOPPED
    assert vmm.started[record.id].kills == 1
    assert not (settings.vms_dir / record.id).exists()


async def test_set_timeout_moves_expiry(manager: SandboxManager) -> None:
    """set_timeout() sets expires_at to now + timeout_s, only on running sandboxes."""
    record = await manager.create(timeout_s=60)
    before = utcnow()
    updated = await manager.set_timeout(record.id, 500)
    assert updated.timeout_s == 500
    assert before + timedelta(seconds=499) < updated.expires_at < utcnow() + timedelta(seconds=501)
    with pytest.raises(errors.InvalidRequest):
        await manager.set_timeout(record.id, 601)
    await manager.kill(record.id)
    with pytest.raises(errors.Conflict, match="is stopped; only a running"):
        await manager.set_timeout(record.id, 10)


async def test_reaper_kills_expired_sandboxes(manager: SandboxManager, vmm: FakeVMM) -> None:
    """A sandbox past its timeout is killed by the reaper and ends stopped."""
    record = await manager.create(timeout_s=1)
    keep = await manager.create(timeout_s=600)
    await wait_for_state(manager, record.id, SandboxState.STOPPED)
    assert vmm.started[record.id].kills == 1
    assert (await manager.get(keep.id)).state is SandboxState.RUNNING


async def test_reaper_marks_crashed_vmm_as_error(
    manager: SandboxManager, vmm: FakeVMM, settings: Settings
) -> None:
    """A VMM that exits on its own is noticed: error 'VMM exited unexpectedly', files gone."""
    record = await manager.create()
    vmm.started[record.id].running = False
    await wait_for_state(manager, record.id, SandboxState.ERROR)
    assert (await manager.get(record.id)).error == VMM_EXITED
    assert not (settings.vms_dir / record.id).exists()
    await manager.kill(record.id)  # cleanup of an error sandbox: error → stopped
    assert (await manager.get(record.id)).state is SandboxState.STOPPED


# -- restarts -------------------------------------------------------------------------------


async def test_close_leaves_sandboxes_running_and_restart_reattaches(
    settings: Settings, procs: list[subprocess.Popen[bytes]]
) -> None:
    """close() detaches without killing; the next start() re-attaches live VMMs."""
    first = FakeVMM(spawn=True)
    first.procs = procs
    async with make_manager(settings, first) as manager:
        record = await manager.create()
    sandbox = first.started[record.id]
    assert sandbox.detached and sandbox.kills == 0 and sandbox.proc is not None
    assert sandbox.proc.poll() is None

    second = FakeVMM()
    async with make_manager(settings, second) as manager:
        assert (await manager.get(record.id)).state is SandboxState.RUNNING
        assert second.attached[record.id].attached_pid == sandbox.pid
        assert (await manager.exec(record.id, ExecSpec(["true"]))).exit_code == 0
    assert (settings.vms_dir / record.id).is_dir()


async def test_restart_settles_dead_and_unfinished_rows(settings: Settings, vmm: FakeVMM) -> None:
    """On start: dead running rows → error, creating → error, stopping → stopped; dirs go."""
    rows = [
        stale_row(settings, "dead", "running", pid=2**22 + 7),
        stale_row(settings, "nopid", "running", pid=None),
        stale_row(settings, "boot", "creating", pid=None),
        stale_row(settings, "halt", "stopping", pid=None),
    ]
    await seed_rows(settings, *rows)
    for row in rows:
        assert row.work_dir is not None
        row.work_dir.mkdir(parents=True)
    async with make_manager(settings, vmm) as manager:
        states = {r.id: (r.state.value, r.error) for r in await manager.list()}
    assert states == {
        "dead": ("error", VMM_GONE),
        "nopid": ("error", VMM_GONE),
        "boot": ("error", RESTARTED_DURING_BOOT),
        "halt": ("stopped", None),
    }
    assert list(settings.vms_dir.iterdir()) == []
    assert vmm.attached == {}


async def test_restart_does_not_trust_a_reused_pid(
    settings: Settings, vmm: FakeVMM, procs: list[subprocess.Popen[bytes]]
) -> None:
    """A live pid whose command line does not name the work dir is not re-attached."""
    stranger = spawn_vmm(settings.vms_dir / "someone-else")
    procs.append(stranger)
    await seed_rows(settings, stale_row(settings, "sb", "running", pid=stranger.pid))
    async with make_manager(settings, vmm) as manager:
        record = await manager.get("sb")
    assert (record.state, record.error) == (SandboxState.ERROR, VMM_GONE)
    assert vmm.attached == {}


async def test_failed_attach_kills_what_remains(
    settings: Settings, vmm: FakeVMM, procs: list[subprocess.Popen[bytes]]
) -> None:
    """If re-attaching fails the VMM is killed, its dir removed and the row is error."""
    work_dir = settings.vms_dir / "sb"
    work_dir.mkdir(parents=True)
    proc = spawn_vmm(work_dir)
    procs.append(proc)
    await seed_rows(settings, stale_row(settings, "sb", "running", pid=proc.pid))
    vmm.attach_fails = True
    async with make_manager(settings, vmm) as manager:
        record = await manager.get("sb")
    assert record.state is SandboxState.ERROR
    assert record.error == "could not re-attach after server restart: agent did not answer"
    assert orphans.read_process(proc.pid) is None  # killed (and reaped: it was our child)
    assert not work_dir.exists()


async def test_orphan_dirs_and_processes_are_removed(
    settings: Settings, vmm: FakeVMM, procs: list[subprocess.Popen[bytes]]
) -> None:
    """On start, dirs and processes under vms_dir that no live row owns are removed/killed."""
    ghost = settings.vms_dir / "ghost"
    ghost.mkdir(parents=True)
    (ghost / "overlay.qcow2").write_bytes(b"x")
    orphan = spawn_vmm(ghost)
    procs.append(orphan)
    bystander = spawn_vmm(settings.data_dir / "elsewhere")  # not under vms_dir: left alone
    procs.append(bystander)
    with anyio.fail_after(5):  # until the interpreter shows its argv
        while not orphans.is_vmm_of(orphan.pid, ghost):  # noqa: ASYNC110 (polls /proc)
            await anyio.sleep(0.01)
    async with make_manager(settings, vmm):
        pass
    assert orphans.read_process(orphan.pid) is None  # killed (and reaped: it was our child)
    assert not ghost.exists()
    assert bystander.poll() is None


# -- /proc parsing --------------------------------------------------------------------------


def test_parse_cmdline_splits_on_nul() -> None:
    """cmdline bytes become argv; a trailing NUL and empty input are handled."""
    assert host.parse_cmdline(b"qemu\0-name\0x\0") == ("qemu", "-name", "x")
    assert host.parse_cmdline(b"") == ()
    assert host.parse_cmdline(b"a\0\0b") == ("a", "", "b")


def test_parse_stat_state_survives_odd_names() -> None:
    """The state letter is found even when the command name has spaces and parentheses."""
    assert host.parse_stat_state("42 (qemu) S 1 42 42") == "S"
    assert host.parse_stat_state("42 (a) b) (c) Z 1 2") == "Z"


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("/v/ab", True),
        ("/v/ab/", True),
        ("path=/v/ab/agent.sock,server=on", True),
        ("file:/v/ab", True),
        ("/v/abc/agent.sock", False),
        ("/old/v/ab/agent.sock", False),
        ("/v/a", False),
    ],
)
def test_mentions_path_respects_boundaries(arg: str, expected: bool) -> None:
    """A work dir matches only as a whole path, never as a prefix of a longer name."""
    assert orphans.mentions_path(["qemu", arg], Path("/v/ab")) is expected


def test_referenced_children_names_entries_under_a_dir() -> None:
    """Every child of vms_dir named anywhere in argv is found, once."""
    args = [
        "qemu",
        "-chardev",
        "socket,path=/v/ab/agent.sock",
        "-drive",
        "file=/v/cd/overlay,if=virtio",
        "/v/ab/x",
        "/v/",
        "/other/v/zz/q",
    ]
    assert orphans.referenced_children(args, Path("/v")) == {"ab", "cd"}


def test_is_under_refuses_escapes(tmp_path: Path) -> None:
    """Only paths strictly inside vms_dir count; '..' and the dir itself do not."""
    assert orphans.is_under(tmp_path / "a", tmp_path)
    assert not orphans.is_under(tmp_path, tmp_path)
    assert not orphans.is_under(tmp_path / "a" / "..", tmp_path)
    assert not orphans.is_under(tmp_path.parent / "b", tmp_path)


def test_remove_dir_never_leaves_vms_dir(tmp_path: Path) -> None:
    """remove_dir refuses a path outside vms_dir and removes a symlink, not its target."""
    vms, outside = tmp_path / "vms", tmp_path / "keep"
    vms.mkdir()
    outside.mkdir()
    assert not orphans.remove_dir(outside, vms)
    (vms / "link").symlink_to(outside)
    assert orphans.remove_dir(vms / "link", vms)
    assert outside.is_dir() and not (vms / "link").exists()


def test_is_vmm_of_our_own_process() -> None:
    """A live process matches by its argv; a missing pid does not."""
    with contextlib.suppress(FileNotFoundError):
        me = orphans.read_process(os.getpid())
        assert me is not None and me.args
    assert not orphans.is_vmm_of(2**22 + 7, Path("/nowhere"))


# -- background processes and files -------------------------------------------------------


async def test_guest_calls_go_to_the_running_sandbox(manager: SandboxManager, vmm: FakeVMM) -> None:
    """manager.processes and manager.files reach the running sandbox's handle (with its
    env merged in); bad commands are refused first, an unknown id is NotFound and a
    stopped sandbox Conflict."""
    record = await manager.create(env={"A": "1"})
    sandbox = vmm.started[record.id]
    assert await manager.processes.spawn(record.id, SpawnSpec("sleep 9", env={"B": "2"})) == 7
    assert sandbox.spawned == [
        ("sleep 9", {"env": {"A": "1", "B": "2"}, "cwd": None, "timeout_s": None, "pty": None})
    ]
    with pytest.raises(errors.InvalidRequest):
        await manager.processes.spawn(record.id, SpawnSpec(" "))
    with pytest.raises(errors.InvalidRequest):
        await manager.files.stat(record.id, "a\0b")
    assert (await manager.files.stat(record.id, "/etc")).path == "/etc"
    with pytest.raises(errors.NotFound):
        await manager.files.stat("nope", "/etc")
    await manager.kill(record.id)
    with pytest.raises(errors.Conflict, match="stopped"):
        await manager.processes.spawn(record.id, SpawnSpec("true"))


async def test_agent_failure_of_a_sandbox_killed_meanwhile_is_a_conflict(
    manager: SandboxManager, vmm: FakeVMM
) -> None:
    """A call whose agent channel closes because the sandbox was killed meanwhile is a
    Conflict (409), not an agent failure (502)."""
    record = await manager.create()
    sandbox = vmm.started[record.id]
    sandbox.stat_hook = lambda: manager.kill(record.id)
    with pytest.raises(errors.Conflict, match="stopped") as caught:
        await manager.files.stat(record.id, "/etc")
    assert isinstance(caught.value.__cause__, errors.AgentDisconnected)
