"""The guest's warm runtimes (``warm`` and ``run``): a real agent process on the host
with a real python3 zygote. No cgroups and no uid change here (the agent is not PID 1,
nor root); those are proven in the guest by tests/integration/test_run.py."""

from __future__ import annotations

import io
import os
import tarfile

import pytest

from emberbox.agent_client.client import AgentClient, ExecSpec, WarmProgram
from emberbox.guest import commands, warm, warm_zygote
from emberbox.guest.common import BadRequest

pytestmark = pytest.mark.anyio


def _tar(files: dict[str, bytes], top: str = "prog") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _spec(tmp: str, *args: str, stdin: bytes | None = None, timeout_s: float = 20) -> ExecSpec:
    return ExecSpec(
        ["python3", "main.py", *args],
        cwd=f"{tmp}/prog",
        env={"HOME": f"{tmp}/prog"},
        timeout_s=timeout_s,
        stdin=stdin,
    )


def _program(*args: str) -> WarmProgram:
    return WarmProgram("python3", "main.py", list(args))


async def test_a_program_runs_forked_from_the_warm_runtime(
    client: AgentClient, tmp_path: os.PathLike[str]
) -> None:
    """After ``warm``, ``run`` extracts the tar and forks the program: output, exit code,
    argv, cwd, environment and a fresh ``__main__`` as ``python3 main.py`` gives them."""
    assert await client.warm(["python3"]) == ["python3"]
    code = (
        b"import os, sys\n"
        b"print(sys.argv, os.getcwd() == os.path.dirname(__file__), __name__)\n"
        b"print(sorted(os.environ)[:3], os.environ['HOME'].endswith('prog'), file=sys.stderr)\n"
        b"print(os.getpgid(0) == os.getpid(), sys.stdin.read() == '', 'zygote' in globals())\n"
        b"sys.exit(4)\n"
    )
    tmp = str(tmp_path)
    result, warmed = await client.run(
        _spec(tmp, "a b"), tar=_tar({"main.py": code}), tar_dir=tmp, warm=_program("a b")
    )
    assert warmed
    assert result.exit_code == 4 and result.signal is None
    assert result.stdout == b"['main.py', 'a b'] True __main__\nTrue True False\n"
    assert result.stderr == b"['HOME', 'LANG', 'PATH'] True\n"


async def test_an_uncaught_exception_is_printed_as_python_prints_it(
    client: AgentClient, tmp_path: os.PathLike[str]
) -> None:
    """A traceback names the program's frames only; exit code 1. A second run in the same
    agent forks again from the clean zygote: the first run's global is gone."""
    await client.warm(["python3"])
    tmp = str(tmp_path)
    code = b"import builtins\nbuiltins.LEAK = 1\ndef f():\n    raise ValueError('bad')\nf()\n"
    result, warmed = await client.run(
        _spec(tmp), tar=_tar({"main.py": code}), tar_dir=tmp, warm=_program()
    )
    assert warmed and result.exit_code == 1
    lines = result.stderr.decode().splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[1].startswith(f'  File "{tmp}/prog/main.py", line 5')
    assert lines[-1] == "ValueError: bad"
    assert "warm_zygote" not in result.stderr.decode()
    again, warmed = await client.run(
        _spec(tmp),
        tar=_tar({"main.py": b"import builtins\nprint(hasattr(builtins, 'LEAK'))\n"}),
        tar_dir=tmp,
        warm=_program(),
    )
    assert warmed and again.stdout == b"False\n"


async def test_a_timeout_kills_the_forked_program(
    client: AgentClient, tmp_path: os.PathLike[str]
) -> None:
    """Past ``timeout_s`` the child's process group is killed: timed_out, SIGKILL."""
    await client.warm(["python3"])
    tmp = str(tmp_path)
    code = b"import time\nprint('started', flush=True)\ntime.sleep(60)\n"
    result, warmed = await client.run(
        _spec(tmp, timeout_s=0.5), tar=_tar({"main.py": code}), tar_dir=tmp, warm=_program()
    )
    assert warmed and result.timed_out
    assert result.signal == 9 and result.exit_code == 137
    assert result.stdout == b"started\n"


async def test_stdin_and_no_warm_runtime_take_the_exec_path(
    client: AgentClient, tmp_path: os.PathLike[str]
) -> None:
    """With stdin, or before ``warm``, ``run`` runs the argv as ``exec`` does."""
    tmp = str(tmp_path)
    code = b"import sys\nprint('got', sys.stdin.read())\n"
    cold, warmed = await client.run(
        _spec(tmp, stdin=b"x"), tar=_tar({"main.py": code}), tar_dir=tmp, warm=_program()
    )
    assert not warmed and cold.stdout == b"got x\n"
    await client.warm(["python3"])
    with_stdin, warmed = await client.run(_spec(tmp, stdin=b"y"), warm=_program())
    assert not warmed and with_stdin.stdout == b"got y\n"


async def test_warm_reports_runtimes_it_cannot_start(client: AgentClient) -> None:
    """An unknown runtime is listed as unavailable, not an error."""
    answer = await client.request("warm", runtimes=["python3", "cobol"])
    assert answer["runtimes"] == ["python3"]
    assert "cobol" in answer["unavailable"]


def test_parse_warm_checks_its_fields() -> None:
    """``warm`` needs a runtime and a script; args are strings."""
    assert warm.parse_warm({}) is None
    program = warm.parse_warm({"warm": {"runtime": "python3", "script": "m.py", "uid": 5}})
    assert program == warm.WarmProgram("python3", "m.py", [], 5, None)
    for bad in ({"runtime": "python3"}, {"runtime": "p", "script": "m", "args": [1]}, "x"):
        with pytest.raises(BadRequest):
            warm.parse_warm({"warm": bad})


def test_fits_refuses_stdin_and_python_variables() -> None:
    """Only a run without stdin and without PYTHON* variables goes warm."""
    cmd = commands.parse_command({"argv": ["python3"], "env": {"HOME": "/tmp"}})
    assert warm.fits(cmd, None) and warm.fits(cmd, b"")
    assert not warm.fits(cmd, b"input")
    odd = commands.parse_command({"argv": ["python3"], "env": {"PYTHONPATH": "/x"}})
    assert not warm.fits(odd, None)


def test_the_zygote_request_has_the_whole_environment() -> None:
    """The child's environment is exec's defaults plus the request's env."""
    cmd = commands.parse_command({"argv": ["x"], "env": {"HOME": "/w"}, "cwd": "/w"})
    request = warm.zygote_request(cmd, warm.WarmProgram("python3", "m.py", ["a"], 1, 2))
    assert request["env"] == {**commands.DEFAULT_ENV, "HOME": "/w"}
    assert (request["cwd"], request["uid"], request["gid"], request["args"]) == ("/w", 1, 2, ["a"])


async def test_status_lines_parse_pid_status_and_end() -> None:
    """The zygote's lines may come split anywhere; an early end answers None."""
    lines = warm.StatusLines()
    lines.feed(b"pid 4")
    assert not lines.pid.done()
    lines.feed(b"2\nstatus 256\n")
    assert await lines.pid == 42 and await lines.status == 256
    ended = warm.StatusLines()
    ended.ended()
    assert await ended.pid is None and await ended.status is None


def test_the_zygote_preloads_only_standard_modules() -> None:
    """Its preload list imports (on the host's Python too) without error."""
    warm_zygote.preload()
    assert all(name in __import__("sys").modules for name in warm_zygote.PRELOAD)


async def test_the_forked_program_exits_as_the_interpreter_would(
    client: AgentClient, tmp_path: os.PathLike[str]
) -> None:
    """Its non-daemon threads are waited for, atexit functions run, buffered output is
    flushed; a string SystemExit is printed and exits 1."""
    await client.warm(["python3"])
    tmp = str(tmp_path)
    code = (
        b"import atexit, sys, threading, time\n"
        b"atexit.register(lambda: print('atexit'))\n"
        b"threading.Thread(target=lambda: (time.sleep(0.2), print('thread'))).start()\n"
        b"sys.stdout.write('main\\n')\n"
        b"raise SystemExit('bye')\n"
    )
    result, warmed = await client.run(
        _spec(tmp), tar=_tar({"main.py": code}), tar_dir=tmp, warm=_program()
    )
    assert warmed
    assert (result.exit_code, result.stdout, result.stderr) == (
        1,
        b"main\nthread\natexit\n",
        b"bye\n",
    )
