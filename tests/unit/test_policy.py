"""What `emberbox serve` refuses to start with, and what it only warns about."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from emberbox.config import Settings
from emberbox.errors import HostError
from emberbox.service.policy import check_serving


def settings(tmp_path: Path, **kw: object) -> Settings:
    return Settings(data_dir=tmp_path / "data", cache_dir=tmp_path / "cache", **kw)  # type: ignore[arg-type]


def test_loopback_without_a_key_runs_with_a_warning(tmp_path: Path) -> None:
    (warning,) = check_serving(settings(tmp_path, host="127.0.0.1"))
    assert warning.startswith("local mode (no API key): every local user and process")
    assert check_serving(settings(tmp_path, host="::1", api_key=SecretStr("k"))) == []


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "example.org"])
def test_other_addresses_need_a_key(tmp_path: Path, host: str) -> None:
    with pytest.raises(HostError, match="EMBERBOX_API_KEY"):
        check_serving(settings(tmp_path, host=host))
    assert check_serving(settings(tmp_path, host=host, api_key=SecretStr("k"))) == []
    assert check_serving(settings(tmp_path, host=host), db_keys=True) == []


def test_production_needs_a_key_and_a_private_data_dir(tmp_path: Path) -> None:
    with pytest.raises(HostError, match="production mode needs an API key"):
        check_serving(settings(tmp_path, mode="production"))
    assert check_serving(settings(tmp_path, mode="production"), db_keys=True) == []
    keyed = settings(tmp_path, mode="production", api_key=SecretStr("k"))
    assert check_serving(keyed) == []  # the data dir does not exist yet: made 0700
    keyed.data_dir.mkdir(mode=0o755)
    keyed.data_dir.chmod(0o755)
    with pytest.raises(HostError, match="other users can read it"):
        check_serving(keyed)
    keyed.data_dir.chmod(0o700)
    assert check_serving(keyed) == []


def test_production_refuses_qemu_as_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A root server in production mode must drop QEMU to an unprivileged user."""
    monkeypatch.setattr("os.geteuid", lambda: 0)
    keyed = settings(tmp_path, mode="production", api_key=SecretStr("k"), vmm_user="")
    with pytest.raises(HostError, match="refuses to run QEMU as root"):
        check_serving(keyed)
    assert check_serving(settings(tmp_path, mode="development", vmm_user="")) != []
    monkeypatch.setattr("os.geteuid", lambda: 1000)  # not root: QEMU is not root either
    assert check_serving(keyed) == []


def test_serve_refuses_cleanly_without_a_traceback(tmp_path: Path) -> None:
    env = {"EMBERBOX_DATA_DIR": str(tmp_path / "d"), "PATH": "/usr/bin:/bin"}
    code = "import sys; from emberbox.cli import main; sys.exit(main())"
    proc = subprocess.run(
        [sys.executable, "-c", code, "serve", "--host", "0.0.0.0", "--port", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0
    assert "EMBERBOX_API_KEY" in proc.stderr and "Traceback" not in proc.stderr
