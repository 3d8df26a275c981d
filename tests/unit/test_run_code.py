"""One-shot runs over a scripted manager (no VM): the limits drawn from the settings and
the steps of run_code."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from emberbox import errors
from emberbox.agent_client.client import ExecLimits, ExecResult
from emberbox.config import Settings
from emberbox.service.oneshot import runner as run
from emberbox.service.oneshot.runner import RunSpec, RunStatus
from tests.support.fakes_run import HashedImages, ScriptedManager, exec_result

pytestmark = pytest.mark.anyio


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Default settings with private directories."""
    return Settings(data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")


# --- limits ------------------------------------------------------------------------------


def test_run_limits_take_the_settings_defaults(settings: Settings) -> None:
    """No timeout or memory asked: the run_* defaults."""
    limits = run.run_limits(settings, RunSpec("c", ""))
    assert limits == (settings.run_default_timeout_s, settings.run_default_memory_mib)


def test_run_limits_refuse_a_timeout_past_the_maximum(settings: Settings) -> None:
    """A timeout over run_max_timeout_s is a 400 naming the field."""
    with pytest.raises(errors.InvalidRequest) as caught:
        run.run_limits(settings, RunSpec("c", "", timeout_s=settings.run_max_timeout_s + 1))
    assert caught.value.details["field"] == "timeout_s"


@pytest.mark.parametrize(
    ("limit", "vm"), [(16, 512), (256, 512), (257, 1024), (1000, 2048), (7936, 8192)]
)
def test_vm_memory_grows_in_powers_of_two(settings: Settings, limit: int, vm: int) -> None:
    """The guest has the limit plus the overhead, in few sizes (each has a template)."""
    assert run.vm_memory_mib(settings, limit) == vm


def test_vm_memory_stays_within_the_maximum(settings: Settings) -> None:
    """The guest never passes max_memory_mib; a limit that cannot fit is a 400."""
    small = settings.model_copy(update={"max_memory_mib": 1500})
    assert run.vm_memory_mib(small, 1000) == 1500
    with pytest.raises(errors.InvalidRequest):
        run.vm_memory_mib(small, 1500 - run.VM_OVERHEAD_MIB + 1)


# --- run_code over a scripted manager --------------------------------------------------------


async def test_run_code_writes_compiles_runs_and_kills(settings: Settings) -> None:
    """A C run: one sandbox of the run image, the tar, gcc, ./main with limits, then kill."""
    manager = ScriptedManager(lambda argv: exec_result(stdout=b"hi\n", peak_memory_kib=900))
    spec = RunSpec("c", "int main(){}", stdin="in", args=["a"], timeout_s=2, memory_mib=64)
    result = await run.run_code(manager, settings, spec)
    assert result.status is RunStatus.OK
    assert (result.stdout, result.exit_code, result.memory_kib, result.time_ms) == (
        b"hi\n", 0, 900, 5.0,
    )  # fmt: skip
    name, created = manager.calls[0]
    assert name == "create"
    assert created["image"] == "polyglot"
    assert created["memory_mib"] == 512
    name, wrote = manager.calls[1]
    assert (name, wrote["path"]) == ("tar_in", "/tmp")
    with tarfile.open(fileobj=io.BytesIO(wrote["tar"])) as tar:
        assert "run/main.c" in tar.getnames()
    build, ran = manager.execs()
    assert build["argv"][0] == "gcc"
    assert build["nobody"]
    assert build["cwd"] == run.WORK_DIR
    assert build["timeout_s"] == settings.run_compile_timeout_s
    assert build["limits"] == ExecLimits(memory_mib=512 - run.AGENT_RESERVE_MIB, pids=run.PIDS_MAX)
    assert ran == {
        "argv": ["./main", "a"],
        "cwd": run.WORK_DIR,
        "timeout_s": 2,
        "stdin": b"in",
        "limits": ExecLimits(memory_mib=64, pids=run.PIDS_MAX),
        "env": {"HOME": run.WORK_DIR},
        "nobody": True,
    }
    assert manager.calls[-1] == ("kill", "sb-1")


async def test_a_compile_error_stops_before_running(settings: Settings) -> None:
    """gcc failing is compile_error with its output; the program never runs."""

    def script(argv: list[str]) -> ExecResult:
        if argv[0] == "gcc":
            return exec_result(exit_code=1, stderr=b"main.c:1: error: expected ';'\n")
        return exec_result()

    manager = ScriptedManager(script)
    result = await run.run_code(manager, settings, RunSpec("c", "int main("))
    assert result.status is RunStatus.COMPILE_ERROR
    assert b"expected ';'" in result.compile_output
    assert result.exit_code is None
    assert [e["argv"][0] for e in manager.execs()] == ["gcc"]
    assert manager.calls[-1] == ("kill", "sb-1")


async def test_a_compile_timeout_is_a_compile_error(settings: Settings) -> None:
    """A compiler past run_compile_timeout_s is compile_error, and says so."""

    def script(argv: list[str]) -> ExecResult:
        if argv[0] == "g++":
            return exec_result(timed_out=True, exit_code=137, signal=9)
        return exec_result()

    result = await run.run_code(ScriptedManager(script), settings, RunSpec("c++", ""))
    assert result.status is RunStatus.COMPILE_ERROR
    assert b"timed out" in result.compile_output


async def test_a_compiler_out_of_memory_is_a_compile_error(settings: Settings) -> None:
    """A compiler stopped by its cgroup (not the program's limit) is compile_error."""

    def script(argv: list[str]) -> ExecResult:
        if argv[0] == "gcc":
            return exec_result(memory_limited=True, exit_code=137, signal=9)
        return exec_result()

    result = await run.run_code(ScriptedManager(script), settings, RunSpec("c", ""))
    assert result.status is RunStatus.COMPILE_ERROR
    assert b"out of memory" in result.compile_output


async def test_output_past_the_cap_is_cut_and_output_limit(settings: Settings) -> None:
    """More than run_output_max_bytes on a stream: cut to the cap, output_limit."""
    cap = settings.run_output_max_bytes
    manager = ScriptedManager(lambda argv: exec_result(stdout=b"x" * (cap + 1), stderr=b"e"))
    result = await run.run_code(manager, settings, RunSpec("python3", ""))
    assert result.status is RunStatus.OUTPUT_LIMIT
    assert len(result.stdout) == cap
    assert result.stderr == b"e"


async def test_an_agent_that_outlives_the_timeout_is_a_timeout(settings: Settings) -> None:
    """ExecTimeout from the manager (the agent did not answer) is status timeout."""

    def script(argv: list[str]) -> ExecResult:
        if argv[0] == "python3":
            raise errors.ExecTimeout("no answer", result=None)
        return exec_result()

    result = await run.run_code(ScriptedManager(script), settings, RunSpec("python3", ""))
    assert result.status is RunStatus.TIMEOUT


async def test_the_sandbox_is_killed_when_the_run_fails(settings: Settings) -> None:
    """An agent failure propagates, and the sandbox is killed anyway."""

    def script(argv: list[str]) -> ExecResult:
        raise errors.AgentDisconnected("gone")

    manager = ScriptedManager(script)
    with pytest.raises(errors.AgentDisconnected):
        await run.run_code(manager, settings, RunSpec("python3", ""))
    assert manager.calls[-1] == ("kill", "sb-1")


async def test_a_failed_write_propagates_and_kills(settings: Settings) -> None:
    """The guest refusing the files is the server's error; the sandbox is killed anyway."""
    manager = ScriptedManager()
    manager.files.error = errors.AgentRequestFailed("No space left on device")
    with pytest.raises(errors.AgentRequestFailed, match="No space"):
        await run.run_code(manager, settings, RunSpec("python3", ""))
    assert manager.calls[-1] == ("kill", "sb-1")
    assert manager.execs() == []


async def test_bad_requests_start_no_sandbox(settings: Settings) -> None:
    """Unknown language, bad files, NUL in args, limits: 400 before create."""
    manager = ScriptedManager()
    bad = [
        RunSpec("cobol", ""),
        RunSpec("c", "", files=[("../x", "")]),
        RunSpec("python3", "", args=["a\0b"]),
        RunSpec("python3", "", memory_mib=1 << 20),
        RunSpec("python3", "", timeout_s=0),
    ]
    for spec in bad:
        with pytest.raises(errors.InvalidRequest):
            await run.run_code(manager, settings, spec)
    assert manager.calls == []


async def test_a_missing_run_image_is_a_host_error(settings: Settings) -> None:
    """No polyglot image on the server: 503 telling the operator how to build it."""
    manager = ScriptedManager(create_error=errors.ImageNotFound("polyglot", ["default"]))
    with pytest.raises(errors.HostError, match="emberbox image build --name polyglot"):
        await run.run_code(manager, settings, RunSpec("python3", ""))


async def test_language_versions_are_asked_once_per_image_build(settings: Settings) -> None:
    """One sandbox answers the versions; the next call uses the cache until a rebuild."""
    manager = ScriptedManager(lambda argv: exec_result(stdout=b"python3=Python 3.11.2\n"))
    images, versions = HashedImages("aaa"), run.LanguageVersions()
    first = await versions.languages(manager, settings, images)
    assert {i.name: i.version for i in first}["python3"] == "3.11.2"
    assert {i.name: i.version for i in first}["node"] is None
    await versions.languages(manager, settings, images)
    assert [c[0] for c in manager.calls] == ["create", "exec", "kill"]
    images.image_hash = "bbb"
    await versions.languages(manager, settings, images)
    assert [c[0] for c in manager.calls].count("create") == 2
