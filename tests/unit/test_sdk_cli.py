"""``emberbox sandbox ...`` and ``emberbox snapshot ...`` commands against the real app
(fake manager) on a free port."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from click.testing import Result
from typer.testing import CliRunner

from emberbox import errors
from emberbox.cli import files, forward, ids, snapshot
from emberbox.cli.common import EXIT_ERROR
from emberbox.cli.sandbox import app
from emberbox.sdk import Sandbox
from tests.support.fakes_manager import FakeManager, fake_app
from tests.support.servers import serving

runner = CliRunner()


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeManager]:
    """A live server whose URL is in EMBERBOX_URL; yields its fake manager."""
    server_app, manager = fake_app(tmp_path)
    with serving(server_app) as url:
        monkeypatch.setenv("EMBERBOX_URL", url)
        monkeypatch.delenv("EMBERBOX_API_KEY", raising=False)
        yield manager


def _create(*args: str) -> str:
    result = runner.invoke(app, ["create", "--json", *args])
    assert result.exit_code == 0, result.output
    sandbox_id: str = json.loads(result.stdout)["id"]
    return sandbox_id


def test_create_list_get_timeout_kill(served: FakeManager) -> None:
    """The management commands print tables or JSON and act on the server."""
    sandbox_id = _create("--image", "python", "--metadata", "team=a", "--env", "A=1")
    assert served.records[sandbox_id].metadata == {"team": "a"}
    listed = runner.invoke(app, ["list", "--json", "--metadata", "team=a"])
    assert [s["id"] for s in json.loads(listed.stdout)] == [sandbox_id]
    table = runner.invoke(app, ["list"])
    assert table.exit_code == 0
    assert sandbox_id in table.stdout
    assert "team=a" in table.stdout
    got = runner.invoke(app, ["get", sandbox_id, "--json"])
    assert json.loads(got.stdout)["image"] == "python"
    extended = runner.invoke(app, ["timeout", sandbox_id, "600", "--json"])
    assert json.loads(extended.stdout)["timeout_s"] == 600
    assert runner.invoke(app, ["kill", sandbox_id]).exit_code == 0
    assert served.records[sandbox_id].state.value == "stopped"
    assert runner.invoke(app, ["kill", sandbox_id]).exit_code == 0


def test_exec_prints_output_and_exits_with_the_commands_status(served: FakeManager) -> None:
    """exec writes stdout/stderr as they are and exits with the command's exit code."""
    sandbox_id = _create()
    ok = runner.invoke(app, ["exec", sandbox_id, "echo hi"])
    assert ok.exit_code == 0
    assert ok.stdout == f"ran echo hi in {sandbox_id}\n"
    assert ok.stderr == "err\ufffd\n"
    failed = runner.invoke(app, ["exec", "--cwd", "/tmp", sandbox_id, "ls", "-la", "fail"])
    assert failed.exit_code == 3
    assert served.calls[-1][1]["cmd"] == ["ls", "-la", "fail"]
    as_json = runner.invoke(app, ["exec", "--json", sandbox_id, "fail"])
    assert (as_json.exit_code, json.loads(as_json.stdout)["exit_code"]) == (3, 3)


def test_errors_are_one_line_without_traceback(served: FakeManager) -> None:
    """A server error is one 'emberbox: error: message' line on stderr and exit status 125."""
    result = runner.invoke(app, ["get", "sb-nope"])
    assert result.exit_code == EXIT_ERROR
    assert result.stderr.strip().splitlines() == ["emberbox: error: no sandbox 'sb-nope'"]
    assert "Traceback" not in result.output
    missing = runner.invoke(app, ["create", "--image", "ruby"])
    assert missing.exit_code == EXIT_ERROR
    assert "available images: default, python" in missing.stderr
    bad = runner.invoke(app, ["create", "--metadata", "novalue"])
    assert bad.exit_code == 2


def test_unreachable_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """No server: a clear HostError line, not a traceback."""
    monkeypatch.delenv("EMBERBOX_API_KEY", raising=False)
    result = runner.invoke(app, ["list", "--url", "http://127.0.0.1:1"])
    assert result.exit_code == EXIT_ERROR
    assert result.stderr.startswith("emberbox: error: cannot reach emberbox at http://127.0.0.1:1")


def test_pause_resume_snapshot_and_fork(served: FakeManager) -> None:
    """pause/resume print the sandbox; snapshot prints its id; create --snapshot forks."""
    sandbox_id = _create("--vcpus", "2")
    paused = runner.invoke(app, ["pause", sandbox_id, "--json"])
    assert (paused.exit_code, json.loads(paused.stdout)["state"]) == (0, "paused")
    again = runner.invoke(app, ["pause", sandbox_id])
    assert again.exit_code == EXIT_ERROR
    assert again.stderr.startswith("emberbox: error: ")
    resumed = runner.invoke(app, ["resume", sandbox_id])
    assert resumed.exit_code == 0
    assert "running" in resumed.stdout
    taken = runner.invoke(app, ["snapshot", sandbox_id])
    assert taken.exit_code == 0, taken.output
    snapshot_id = taken.stdout.strip()
    assert list(served.snapshots) == [snapshot_id]
    as_json = runner.invoke(app, ["snapshot", sandbox_id, "--json"])
    assert json.loads(as_json.stdout)["sandbox_id"] == sandbox_id
    fork_id = _create("--snapshot", snapshot_id)
    assert served.records[fork_id].snapshot_id == snapshot_id
    assert served.records[fork_id].vcpus == 2
    mismatch = runner.invoke(app, ["create", "--snapshot", snapshot_id, "--vcpus", "1"])
    assert mismatch.exit_code == EXIT_ERROR
    assert "Traceback" not in mismatch.output


def test_snapshot_list_and_rm(served: FakeManager) -> None:
    """snapshot list shows a table or JSON (optionally of one sandbox); rm deletes."""
    first, second = _create(), _create()
    ids = [runner.invoke(app, ["snapshot", sb]).stdout.strip() for sb in (first, second)]
    listed = runner.invoke(snapshot.app, ["list", "--json"])
    assert [s["id"] for s in json.loads(listed.stdout)] == ids
    mine = runner.invoke(snapshot.app, ["list", "--json", "--sandbox", second])
    assert [s["id"] for s in json.loads(mine.stdout)] == ids[1:]
    table = runner.invoke(snapshot.app, ["list"])
    assert table.exit_code == 0
    assert ids[0] in table.stdout
    assert "/nonexistent" not in table.stdout
    fork_id = _create("--snapshot", ids[0])
    in_use = runner.invoke(snapshot.app, ["rm", ids[0]])
    assert in_use.exit_code == EXIT_ERROR
    assert fork_id in in_use.stderr
    assert runner.invoke(app, ["kill", fork_id]).exit_code == 0
    removed = runner.invoke(snapshot.app, ["rm", ids[0]])
    assert removed.exit_code == 0
    assert list(served.snapshots) == ids[1:]
    gone = runner.invoke(snapshot.app, ["rm", ids[0]])
    assert gone.exit_code == EXIT_ERROR
    assert gone.stderr.strip().splitlines() == [f"emberbox: error: no snapshot {ids[0]}"]


def test_snapshot_commands_are_mounted() -> None:
    """`emberbox snapshot` and the new `emberbox sandbox` verbs exist in the real CLI."""
    main = "import sys; from emberbox.cli import main; sys.exit(main())"
    for args, names in [
        (["snapshot", "--help"], ("list", "rm")),
        (["sandbox", "--help"], ("pause", "resume", "snapshot", "shell")),
        (["--help"], ("cp",)),
    ]:
        done = subprocess.run(
            [sys.executable, "-c", main, *args], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert all(name in done.stdout for name in names), done.stdout


# --- cp and shell ------------------------------------------------------------------------

cp_app = typer.Typer()
cp_app.command()(files.cp)


def _cp(*args: str, stdin: bytes | None = None) -> Result:
    return runner.invoke(cp_app, list(args), input=stdin)


def test_cp_copies_files_both_ways(served: FakeManager, tmp_path: Path) -> None:
    """LOCAL ID:PATH uploads (keeping the mode), ID:PATH LOCAL downloads; a directory as
    the destination takes the file under its own name; - is stdin or stdout."""
    sandbox_id = _create()
    guest = served.guests[sandbox_id]
    local = tmp_path / "a.txt"
    local.write_text("hello")
    local.chmod(0o640)
    assert _cp(str(local), f"{sandbox_id}:/tmp/b.txt").exit_code == 0
    assert (guest.files["/tmp/b.txt"], guest.modes["/tmp/b.txt"]) == (b"hello", 0o640)
    assert _cp(str(local), f"{sandbox_id}:/tmp").exit_code == 0
    assert guest.files["/tmp/a.txt"] == b"hello"
    down = tmp_path / "down"
    down.mkdir()
    assert _cp(f"{sandbox_id}:/tmp/b.txt", str(down)).exit_code == 0
    assert (down / "b.txt").read_text() == "hello"
    assert _cp(f"{sandbox_id}:/tmp/b.txt", str(tmp_path / "c.txt")).exit_code == 0
    assert (tmp_path / "c.txt").read_text() == "hello"
    assert _cp("-", f"{sandbox_id}:/tmp/in", stdin=b"from stdin").exit_code == 0
    assert guest.files["/tmp/in"] == b"from stdin"
    out = _cp(f"{sandbox_id}:/tmp/in", "-")
    assert (out.exit_code, out.stdout) == (0, "from stdin")


def test_cp_copies_directories_both_ways(served: FakeManager, tmp_path: Path) -> None:
    """A directory onto a missing path becomes it; onto an existing one goes inside."""
    sandbox_id = _create()
    guest = served.guests[sandbox_id]
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "x").write_text("X")
    assert _cp(str(tree), f"{sandbox_id}:/srv/app").exit_code == 0
    assert guest.files["/srv/app/sub/x"] == b"X"
    assert _cp(str(tree), f"{sandbox_id}:/srv").exit_code == 0
    assert guest.files["/srv/tree/sub/x"] == b"X"
    copied = _cp(f"{sandbox_id}:/srv/app", str(tmp_path / "back"))
    assert copied.exit_code == 0, copied.output
    assert (tmp_path / "back" / "sub" / "x").read_text() == "X"
    assert _cp(f"{sandbox_id}:/srv/app", str(tmp_path / "back")).exit_code == 0
    assert (tmp_path / "back" / "app" / "sub" / "x").read_text() == "X"


def test_cp_refusals(served: FakeManager, tmp_path: Path) -> None:
    """Two local paths (or two remote ones) are a usage error; a missing path is one line."""
    sandbox_id = _create()
    assert _cp(str(tmp_path), str(tmp_path / "x")).exit_code == 2
    assert _cp(f"{sandbox_id}:/a", f"{sandbox_id}:/b").exit_code == 2
    missing = _cp(f"{sandbox_id}:/nope", str(tmp_path / "x"))
    assert missing.exit_code == EXIT_ERROR
    assert missing.stderr.startswith("emberbox: error: ")
    assert "Traceback" not in missing.output
    assert files.parse_remote("./a:b") is None
    assert files.parse_remote("sb-1:/x") == ("sb-1", "/x")
    assert files.parse_remote("sb-1:") == ("sb-1", "/")


def test_shell_relays_piped_input_and_exits_with_the_programs_status(
    served: FakeManager,
) -> None:
    """`sandbox shell` without a terminal: stdin goes in as typed, its end is Ctrl-D, the
    output comes back, and the exit status is the program's."""
    sandbox_id = _create()
    main = "import sys; from emberbox.cli import main; sys.exit(main())"
    command = [sys.executable, "-c", main, "sandbox", "shell", sandbox_id]
    done = subprocess.run(command, input=b"echo hi\n", capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(b"echo hi\n")
    exited = subprocess.run(command, input=b"exit 5", capture_output=True, timeout=60)
    assert (exited.returncode, exited.stdout) == (5, b"exit 5")
    assert not [p for p in served.guests[sandbox_id].processes.values() if p.running]


# --- without the server's dependencies (pip install emberbox) ----------------------------

# Runs the CLI as if fastapi, uvicorn, pydantic-settings and lz4 were not installed.
CLIENT_ONLY_MAIN = (
    "import sys; "
    "sys.modules.update(dict.fromkeys(['fastapi', 'uvicorn', 'pydantic_settings', 'lz4'])); "
    "sys.argv[0] = 'emberbox'; from emberbox.cli import main; main()"
)


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "--help"],
        ["serve", "--port", "1"],
        ["image", "build", "--name", "default"],
        ["run", "--", "ls"],
        ["keys", "list"],
        ["audit"],
        ["doctor"],
    ],
)
def test_server_verbs_without_the_server_say_what_to_install(args: list[str]) -> None:
    """A server verb in a client-only install prints one line naming the extra, exits 1."""
    done = subprocess.run(
        [sys.executable, "-c", CLIENT_ONLY_MAIN, *args], capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout) == (1, ""), done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith(f"emberbox {args[0]} needs the server: pip install 'emberbox[server]'")


def test_client_verbs_without_the_server() -> None:
    """In a client-only install every verb is listed and the client verbs work."""
    for args, names in [
        (["--help"], ("sandbox", "snapshot", "cp", "exec-code", "serve", "image", "doctor")),
        (["sandbox", "--help"], ("create", "exec", "shell")),
    ]:
        done = subprocess.run(
            [sys.executable, "-c", CLIENT_ONLY_MAIN, *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert all(name in done.stdout for name in names), done.stdout


def test_exec_takes_a_double_dash_as_a_separator(served: FakeManager) -> None:
    """`exec ID -- ls -l` runs ls, not a program named `--`; `--` alone is a usage error."""
    sandbox_id = _create()
    result = runner.invoke(app, ["exec", sandbox_id, "--", "ls", "-la", "fail"])
    assert result.exit_code == 3
    assert served.calls[-1][1]["cmd"] == ["ls", "-la", "fail"]
    assert runner.invoke(app, ["exec", sandbox_id, "--"]).exit_code == 2


def test_ids_are_whole_in_narrow_tables_and_prefixes_name_them(served: FakeManager) -> None:
    """An 80-column (piped) table shows whole ids; a unique prefix stands for the id; an
    ambiguous one is an error that lists the matches."""
    first, second = _create("--metadata", "k=" + "v" * 60), _create()
    table = runner.invoke(app, ["list"], env={"COLUMNS": "80"})
    assert first in table.stdout and second in table.stdout
    common = "sb-"  # the fake ids are sb-1, sb-2, ...
    unique = first[: len(common) + 1]
    got = runner.invoke(app, ["get", unique, "--json"])
    assert json.loads(got.stdout)["id"] == first
    ambiguous = runner.invoke(app, ["get", common])
    assert ambiguous.exit_code == EXIT_ERROR
    assert first in ambiguous.stderr and second in ambiguous.stderr


def test_match_prefix() -> None:
    """An exact id wins over a longer one it starts; no match passes the text through."""
    assert ids.match_prefix("ab", ["ab", "abc"]) == "ab"
    assert ids.match_prefix("abc", ["abcd", "b"]) == "abcd"
    assert ids.match_prefix("zz", ["abcd"]) == "zz"
    with pytest.raises(errors.InvalidRequest, match="2 sandbox ids"):
        ids.match_prefix("a", ["ab", "ac"])


def test_top_level_exports_are_lazy() -> None:
    """`from emberbox import Sandbox, AsyncSandbox` works and `import emberbox` alone
    loads no SDK module."""
    code = "import sys, emberbox; print('emberbox.sdk' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
    from emberbox import AsyncSandbox, Sandbox
    from emberbox.sdk import AsyncSandbox as SdkAsync
    from emberbox.sdk import Sandbox as SdkSandbox

    assert (Sandbox, AsyncSandbox) == (SdkSandbox, SdkAsync)


def test_port_forward_ports_and_sdk_port_urls() -> None:
    """[LOCAL:]REMOTE parses as kubectl's does; the SDK names a port's URL and host."""
    assert forward.parse_ports("8000") == (8000, 8000)
    assert forward.parse_ports("9000:80") == (9000, 80)
    assert forward.parse_ports("0:80") == (0, 80)
    for bad in ("x", "80:0", "70000", "1:2:3"):
        with pytest.raises(typer.BadParameter):
            forward.parse_ports(bad)
    sb = Sandbox("abc", url="http://h:1/", api_key="k")
    assert sb.get_host(8000) == "h:1/v1/sandboxes/abc/ports/8000"
    assert sb.ports.url(8000, "/x?y=1") == "http://h:1/v1/sandboxes/abc/ports/8000/x?y=1"
