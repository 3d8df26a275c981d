"""API keys for tests: ``emberbox keys create`` run next to a server, as an operator does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support.paths import REPO

CLI = "import sys; from emberbox.cli import main; sys.exit(main())"


def emberbox_cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``emberbox ARGS`` on ``data_dir``, as an operator runs it next to the server."""
    env = {**os.environ, "EMBERBOX_DATA_DIR": str(data_dir)}
    env.pop("EMBERBOX_API_KEY", None)
    return subprocess.run(
        [sys.executable, "-c", CLI, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def make_key(data_dir: Path, *args: str) -> str:
    """A new key (``keys create ARGS``, e.g. ``--name alice --admin``); its secret."""
    made = emberbox_cli(data_dir, "keys", "create", *args)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("eb_") and "shown only now" in made.stderr
    return key
