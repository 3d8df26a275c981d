"""The CLI as a new user types it, against a real server and real VMs: `exec ID -- cmd`,
`cp` of directories as `cp -r` does it, whole ids in piped tables, id prefixes."""

from __future__ import annotations

import filecmp
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from emberbox.images.registry import ImageInfo
from tests.support.paths import REPO, short_tmp_dir
from tests.support.servers import Server, serve_emberbox

pytestmark = [pytest.mark.vm]


@pytest.fixture(scope="module")
def server(default_image: ImageInfo) -> Iterator[Server]:
    """One server for the module, no warm pool."""
    data_dir = short_tmp_dir("eb-cli-")
    try:
        with serve_emberbox(data_dir, EMBERBOX_POOL_SIZE="0") as running:
            yield running
    finally:
        subprocess.run(["rm", "-rf", str(data_dir)], check=False)


@pytest.fixture(scope="module")
def sandbox_id(server: Server) -> str:
    """One sandbox shared by the module's tests."""
    created = _cli(server, "sandbox", "create", "--json")
    assert created.returncode == 0, created.stderr
    sandbox: str = json.loads(created.stdout)["id"]
    return sandbox


def _cli(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", "import sys; from emberbox.cli import main; sys.exit(main())"]
    env = {**os.environ, "EMBERBOX_URL": server.url, "COLUMNS": "80"}
    env.pop("EMBERBOX_API_KEY", None)
    return subprocess.run(
        [*command, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def test_exec_double_dash_is_a_separator(server: Server, sandbox_id: str) -> None:
    """`sandbox exec ID -- sh -c 'exit 3'` runs sh (not `--`) and exits 3."""
    ran = _cli(server, "sandbox", "exec", sandbox_id, "--", "sh", "-c", "echo hi; exit 3")
    assert (ran.returncode, ran.stdout) == (3, "hi\n"), ran.stderr


def test_cp_of_a_directory_matches_cp_r(server: Server, sandbox_id: str, tmp_path: Path) -> None:
    """A directory copied into an existing directory lands under its own name, both ways,
    exactly where `cp -r` puts it."""
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_text("A")
    (tree / "sub" / "b.bin").write_bytes(os.urandom(1000))
    assert _cli(server, "sandbox", "exec", sandbox_id, "mkdir -p /work").returncode == 0
    up = _cli(server, "cp", str(tree), f"{sandbox_id}:/work")
    assert up.returncode == 0, up.stderr
    listed = _cli(server, "sandbox", "exec", sandbox_id, "cd /work && find . | sort")
    assert listed.stdout.split() == [
        ".",
        "./tree",
        "./tree/a.txt",
        "./tree/sub",
        "./tree/sub/b.bin",
    ]
    back, reference = tmp_path / "back", tmp_path / "reference"
    back.mkdir()
    reference.mkdir()
    down = _cli(server, "cp", f"{sandbox_id}:/work/tree", str(back))
    assert down.returncode == 0, down.stderr
    subprocess.run(["cp", "-r", str(tree), str(reference)], check=True)
    assert sorted(p.name for p in back.iterdir()) == ["tree"]
    compared = filecmp.dircmp(back / "tree", reference / "tree")
    assert (compared.left_only, compared.right_only, compared.diff_files) == ([], [], [])
    assert filecmp.cmp(back / "tree/sub/b.bin", tree / "sub/b.bin", shallow=False)


def test_piped_list_shows_whole_ids_and_prefixes_work(server: Server, sandbox_id: str) -> None:
    """`sandbox list | cat` (80 columns) shows the whole id; a unique prefix names the
    sandbox; a prefix two sandboxes share is refused with both ids."""
    listed = _cli(server, "sandbox", "list")
    assert sandbox_id in listed.stdout, listed.stdout
    ran = _cli(server, "sandbox", "exec", sandbox_id[:5], "--", "echo", "ok")
    assert (ran.returncode, ran.stdout) == (0, "ok\n"), ran.stderr
    twin = _stopped_twin(server, sandbox_id, sandbox_id[:6] + "-twin")
    refused = _cli(server, "sandbox", "get", sandbox_id[:6])
    assert refused.returncode != 0
    assert sandbox_id in refused.stderr and twin in refused.stderr
    got = _cli(server, "sandbox", "get", "--json", sandbox_id)  # the whole id still wins
    assert json.loads(got.stdout)["id"] == sandbox_id


def _stopped_twin(server: Server, sandbox_id: str, twin_id: str) -> str:
    """A stopped sandbox record whose id starts like ``sandbox_id`` (ids are random, so
    two real ones rarely share a prefix): a copy of its row in the server's database."""
    with sqlite3.connect(server.settings.db_path, timeout=30) as conn:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(sandboxes)")]
        blank = ("vmm_pid", "work_dir", "ip_address")  # nothing of the real VM's
        copied = ", ".join(
            "?" if c in ("id", "state") else "NULL" if c in blank else c for c in columns
        )
        conn.execute(
            f"INSERT INTO sandboxes ({', '.join(columns)}) SELECT {copied} FROM sandboxes "
            "WHERE id = ?",
            [twin_id if c == "id" else "stopped" for c in columns if c in ("id", "state")]
            + [sandbox_id],
        )
    return twin_id
