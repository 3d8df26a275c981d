"""``POST /v1/run`` and ``GET /v1/languages`` over a fake manager that "runs" programs by
markers in their source; the SDK's run_code and ``emberbox exec-code`` against it."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from fastapi import FastAPI
from typer.testing import CliRunner

import emberbox
from emberbox import errors, sdk
from emberbox.api import create_app
from emberbox.cli import exec_code as cli_exec_code
from emberbox.config import Settings
from emberbox.service.oneshot.runner import LANGUAGES
from tests.support.fakes_manager import FakeRegistry
from tests.support.fakes_run import ProgramManager
from tests.support.servers import serving

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """Run async tests on asyncio only."""
    return "asyncio"


@pytest.fixture
def manager() -> ProgramManager:
    """A fresh fake manager."""
    return ProgramManager()


@pytest.fixture
def app(tmp_path: Path, manager: ProgramManager) -> FastAPI:
    """The real app over the fake manager (and fake images, `polyglot` among them)."""
    settings = Settings(data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")
    registry = FakeRegistry(tmp_path / "images", names=("default", "polyglot"))
    return create_app(settings, manager, registry=registry)  # type: ignore[arg-type]


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client talking to the app in-process."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
        yield c


async def _run(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await client.post("/v1/run", json=body)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


@pytest.mark.parametrize(
    ("language", "code", "status", "exit_code"),
    [
        ("python3", "print('hello')", "ok", 0),
        ("bash", "echo hello", "ok", 0),
        ("node", "console.log('hello')", "ok", 0),
        ("c", "int main(){}", "ok", 0),
        ("c++", "int main(){}", "ok", 0),
        ("c", "SYNTAX", "compile_error", None),
        ("python3", "LOOP", "timeout", 137),
        ("c", "ALLOC", "memory_limit", 137),
        ("python3", "SPAM", "output_limit", 0),
        ("python3", "EXIT3", "runtime_error", 3),
    ],
)
async def test_run_answers_each_status(
    client: httpx.AsyncClient,
    manager: ProgramManager,
    language: str,
    code: str,
    status: str,
    exit_code: int | None,
) -> None:
    """Every status of the issue comes back as 200 with the right fields; no sandbox stays."""
    answer = await _run(client, language=language, code=code)
    assert answer["status"] == status
    assert answer["exit_code"] == exit_code
    assert set(answer) == {
        "status", "exit_code", "signal", "stdout", "stderr", "compile_output", "time_ms",
        "memory_kib",
    }  # fmt: skip
    assert manager.live == set()


async def test_run_passes_stdin_args_and_files(client: httpx.AsyncClient) -> None:
    """stdin and args reach the program; extra files land next to it; output is cut."""
    answer = await _run(
        client,
        language="python3",
        code="print()",
        stdin="in ",
        args=["a", "b"],
        files=[{"name": "lib/u.py", "content": "X=1"}],
        timeout_s=3,
        memory_mib=64,
    )
    assert answer["stdout"] == "hello in a b"
    assert answer["time_ms"] == 12.5
    assert answer["memory_kib"] == 2048
    spam = await _run(client, language="python3", code="SPAM")
    assert len(spam["stdout"]) == 1 << 20


async def test_compile_errors_carry_the_compilers_output(client: httpx.AsyncClient) -> None:
    """compile_output holds what the compiler said."""
    answer = await _run(client, language="c", code="SYNTAX")
    assert "error: SYNTAX" in answer["compile_output"]


async def test_unknown_language_is_a_400_listing_the_languages(client: httpx.AsyncClient) -> None:
    """An unknown language is InvalidRequest naming every language."""
    response = await client.post("/v1/run", json={"language": "cobol", "code": ""})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "InvalidRequest"
    assert all(name in error["message"] for name in LANGUAGES)


@pytest.mark.parametrize(
    "body",
    [
        {"language": "c"},  # no code
        {"language": "c", "code": "", "colour": "red"},  # unknown field
        {"language": "c", "code": "", "memory_mib": 1},
        {"language": "c", "code": "", "timeout_s": 0},
        {"language": "c", "code": "", "files": [{"name": "", "content": ""}]},
    ],
)
async def test_malformed_requests_are_422(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    """Schema violations are 422 ValidationError."""
    response = await client.post("/v1/run", json=body)
    assert response.status_code == 422, response.text


async def test_bad_file_names_and_limits_are_400(client: httpx.AsyncClient) -> None:
    """The service's checks (file names, the server's limits) answer 400 naming the field."""
    bad_name = {"language": "c", "code": "", "files": [{"name": "../x", "content": ""}]}
    assert (await client.post("/v1/run", json=bad_name)).status_code == 400
    too_long = {"language": "c", "code": "", "timeout_s": 10_000}
    response = await client.post("/v1/run", json=too_long)
    assert response.status_code == 400
    assert "timeout_s" in response.json()["error"]["message"]


async def test_languages_lists_versions_found_once(
    client: httpx.AsyncClient, manager: ProgramManager
) -> None:
    """GET /v1/languages: every language, versions from one sandbox, then the cache."""
    response = await client.get("/v1/languages")
    assert response.status_code == 200
    found = {lang["name"]: lang for lang in response.json()["languages"]}
    assert list(found) == list(LANGUAGES)
    assert found["python3"]["version"] == "3.11.2"
    assert found["c"] == {
        "name": "c",
        "version": "12.2.0",
        "source_file": "main.c",
        "compiled": True,
    }
    assert found["bash"]["version"] is None
    await client.get("/v1/languages")
    assert manager.created == 1
    assert manager.live == set()


async def test_run_is_guarded_by_the_api_key(tmp_path: Path, manager: ProgramManager) -> None:
    """With an API key set, /v1/run and /v1/languages need it."""
    settings = Settings(data_dir=tmp_path / "d", cache_dir=tmp_path / "c", api_key="k")
    registry = FakeRegistry(tmp_path / "images", names=("polyglot",))
    app = create_app(settings, manager, registry=registry)  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
        assert (await c.get("/v1/languages")).status_code == 401
        assert (await c.post("/v1/run", json={"language": "c", "code": ""})).status_code == 401


# --- the SDK and the CLI -------------------------------------------------------------------


@pytest.fixture
def url(app: FastAPI, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The app on a real port; its URL is also in EMBERBOX_URL."""
    with serving(app) as found:
        monkeypatch.setenv("EMBERBOX_URL", found)
        monkeypatch.delenv("EMBERBOX_API_KEY", raising=False)
        yield found


def test_sdk_run_code(url: str) -> None:
    """run_code (sdk and package level) returns the server's answer as a RunResult."""
    result = sdk.run_code("python3", "print()", stdin="x ", args=["y"], files={"u.py": ""})
    assert isinstance(result, sdk.RunResult)
    assert (result.status, result.stdout) == ("ok", "hello x y")
    assert emberbox.run_code("c", "EXIT3").exit_code == 3
    assert [lang.name for lang in sdk.list_languages()] == list(LANGUAGES)
    with pytest.raises(errors.InvalidRequest, match="python3"):
        sdk.run_code("cobol", "")


async def test_sdk_async_run_code(url: str) -> None:
    """async_run_code and async_list_languages mirror the blocking calls."""
    result = await sdk.async_run_code("c", "ALLOC", memory_mib=32)
    assert (result.status, result.memory_kib) == ("memory_limit", 32 * 1024)
    assert len(await sdk.async_list_languages(url=url)) == len(LANGUAGES)


def test_sync_and_async_run_code_have_the_same_parameters() -> None:
    """The two clients cannot drift apart."""
    for sync, asynchronous in [
        (sdk.run_code, sdk.async_run_code),
        (sdk.list_languages, sdk.async_list_languages),
    ]:
        assert inspect.signature(sync).parameters == inspect.signature(asynchronous).parameters


runner = CliRunner()
cli_app = typer.Typer()
cli_app.callback()(lambda: None)  # a group, so that the command is called by its name
cli_app.command("exec-code")(cli_exec_code.exec_code)


def test_exec_code_is_mounted() -> None:
    """`emberbox exec-code` exists in the real CLI."""
    main = "import sys; from emberbox.cli import main; sys.exit(main())"
    done = subprocess.run(
        [sys.executable, "-c", main, "exec-code", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "--language" in done.stdout


@pytest.mark.parametrize(
    ("language", "code", "exit_code"),
    [
        ("python3", "print()", 0),
        ("python3", "EXIT3", 3),
        ("c", "SYNTAX", cli_exec_code.EXIT_COMPILE_ERROR),
        ("python3", "LOOP", cli_exec_code.EXIT_TIMEOUT),
        ("python3", "ALLOC", cli_exec_code.EXIT_MEMORY_LIMIT),
    ],
)
def test_exec_code_exits_as_the_program_did(
    url: str, tmp_path: Path, language: str, code: str, exit_code: int
) -> None:
    """emberbox exec-code prints the output and exits with the program's status."""
    source = tmp_path / "prog"
    source.write_text(code)
    result = runner.invoke(cli_app, ["exec-code", "--language", language, str(source)])
    assert result.exit_code == exit_code, result.output


def test_exec_code_passes_args_stdin_and_files_and_prints_json(url: str, tmp_path: Path) -> None:
    """--stdin, --file and the arguments after FILE reach the program; --json prints all."""
    (tmp_path / "main.py").write_text("print()")
    (tmp_path / "in.txt").write_text("in ")
    (tmp_path / "u.py").write_text("X = 1")
    argv = ["exec-code", "-l", "python3", "--stdin", str(tmp_path / "in.txt"), "--json"]
    argv += ["--file", str(tmp_path / "u.py"), str(tmp_path / "main.py"), "--", "a", "b"]
    result = runner.invoke(cli_app, argv)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["stdout"] == "hello in a b"
    plain = runner.invoke(cli_app, ["exec-code", "-l", "c", str(tmp_path / "main.py")])
    assert plain.stdout == "hello "


def test_exec_code_reports_an_unknown_language_in_one_line(url: str, tmp_path: Path) -> None:
    """A 400 from the server is one error line and exit 125."""
    (tmp_path / "p").write_text("")
    result = runner.invoke(cli_app, ["exec-code", "--language", "cobol", str(tmp_path / "p")])
    assert result.exit_code == 125
    assert "unknown language 'cobol'" in result.stderr
