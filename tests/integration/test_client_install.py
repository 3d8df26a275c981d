"""``pip install emberbox`` (no extras) in a fresh venv: the SDK and the client verbs,
without the server's dependencies, against a real server over real VMs.

The package is built from a copy of the source tree, so the build leaves nothing (build/,
*.egg-info) in the repo. PyPI must be reachable (the venv installs httpx, pydantic, ...).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from emberbox.images.registry import ImageInfo
from tests.support.paths import REPO
from tests.support.servers import serve_emberbox

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]

PIP_TIMEOUT_S = 600
SERVER_ONLY = ("fastapi", "uvicorn", "pydantic_settings", "starlette", "lz4")


class ClientVenv:
    """A venv holding ``pip install <a copy of the repo>``; run things in it from ``cwd``
    (outside the repo, so that ``import emberbox`` finds the installed copy)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cwd = root / "work"
        self.cwd.mkdir()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        self.env.pop("EMBERBOX_URL", None)

    def run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        program = self.root / "bin" / argv[0]
        return subprocess.run(
            [str(program), *argv[1:]],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def python(
        self, code: str, *args: str, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return self.run("python", "-c", textwrap.dedent(code), *args, timeout=timeout)


def _copy_source(dest: Path) -> Path:
    """What the package is built from: pyproject.toml, the README and emberbox/."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "emberbox", dest / "emberbox", ignore=ignore)
    return dest


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClientVenv]:
    """A fresh venv with just the client installed (non-editable, no extras)."""
    root = tmp_path_factory.mktemp("client")
    source = _copy_source(root / "src")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    pip += ["--disable-pip-version-check", "--no-input", str(source)]
    done = subprocess.run(pip, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    assert done.returncode == 0, f"pip install failed:\n{done.stdout}\n{done.stderr}"
    yield ClientVenv(venv)
    shutil.rmtree(root, ignore_errors=True)


def test_the_client_install_has_no_server_dependencies(client: ClientVenv) -> None:
    """The client-only install imports emberbox.sdk from site-packages and lacks fastapi,
    uvicorn and pydantic-settings."""
    done = client.python(
        f"""
        import importlib, sys
        import emberbox, emberbox.sdk
        assert "site-packages" in emberbox.__file__, emberbox.__file__
        for name in {SERVER_ONLY!r}:
            try:
                importlib.import_module(name)
            except ModuleNotFoundError:
                continue
            sys.exit(f"{{name}} is installed")
        print("ok")
        """
    )
    assert (done.returncode, done.stdout) == (0, "ok\n"), done.stderr


@pytest.mark.parametrize(
    "args", [["serve", "--help"], ["image", "build"], ["run", "--", "ls"], ["keys", "list"]]
)
def test_server_verbs_say_what_to_install(client: ClientVenv, args: list[str]) -> None:
    """A server verb prints one line naming `emberbox[server]` and exits 1 (no traceback)."""
    done = client.run("emberbox", *args)
    assert (done.returncode, done.stdout) == (1, ""), done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith(f"emberbox {args[0]} needs the server: pip install 'emberbox[server]'")


def test_client_verbs_are_installed(client: ClientVenv) -> None:
    """`emberbox --help` lists every verb, and the client verbs answer their --help."""
    listed = client.run("emberbox", "--help")
    assert listed.returncode == 0, listed.stderr
    for verb in ("sandbox", "snapshot", "cp", "exec-code", "serve", "image", "keys", "doctor"):
        assert verb in listed.stdout
    shell = client.run("emberbox", "sandbox", "shell", "--help")
    assert shell.returncode == 0, shell.stderr


def test_the_sdk_runs_a_command_on_a_real_server(
    client: ClientVenv, data_dir: Path, default_image: ImageInfo
) -> None:
    """The installed SDK creates a sandbox on a live server, runs `echo hi` and kills it."""
    script = """
        import sys
        from emberbox.sdk import Sandbox
        with Sandbox.create(url=sys.argv[1]) as sb:
            assert sb.commands.run("echo hi").stdout == "hi\\n"
        print("ok")
        """
    with serve_emberbox(data_dir) as server:
        done = client.python(script, server.url, timeout=400)
    assert (done.returncode, done.stdout) == (0, "ok\n"), done.stderr
