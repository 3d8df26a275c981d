"""``emberbox sandbox ...`` commands against the real app (fake manager) on a free port."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from emberbox.cli.common import EXIT_ERROR
from emberbox.cli.sandbox import app
from tests.unit.test_api_fakes import FakeManager, fake_app, serving

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
