"""The host's data dir made full: a dedicated server on a small tmpfs, filled to the last
byte. New sandboxes and uploads get a clear 507 (StorageFull), running sandboxes keep
working, the database stays intact, and everything works again once space is freed.
"""

from __future__ import annotations

import contextlib
import errno
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from emberbox import errors
from emberbox.store import Store
from tests.support.hostile import (
    ACK_PATH,
    Bystander,
    HostileCase,
    hostile_server,
    put_acknowledged,
)
from tests.support.paths import short_tmp_dir

TMPFS_MIB = 96
MIN_FREE_MIB = 16
CHUNK = b"\0" * (1 << 20)


@contextlib.contextmanager
def small_tmpfs(size_mib: int) -> Iterator[Path]:
    """A tmpfs of ``size_mib`` mounted on a fresh dir (root only), unmounted afterwards."""
    mount_point = short_tmp_dir("eb-full-")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    try:
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
        yield mount_point
    finally:
        if mounted.returncode == 0:
            subprocess.run(["umount", "--lazy", str(mount_point)], check=True)
        mount_point.rmdir()


def fill(path: Path) -> int:
    """Write ``path`` until the file system is full; the bytes written."""
    written = 0
    with path.open("wb", buffering=0) as out:
        while True:
            try:
                written += out.write(CHUNK)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
    with path.open("ab", buffering=0) as out:  # the last partial page, too
        for size in (4096, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    written += out.write(b"\0" * size)
    return written


def integrity(db: Path) -> str:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


@pytest.mark.vm
def test_host_data_dir_full(bystander: Bystander, hostile_case: HostileCase) -> None:
    """Data dir full: create and upload answer 507, exec in a running sandbox still
    works, PRAGMA integrity_check is ok, and create/upload work once space is freed."""
    env = {"EMBERBOX_MIN_FREE_DISK_MIB": str(MIN_FREE_MIB)}
    with small_tmpfs(TMPFS_MIB) as data_dir, hostile_server(env, data_dir=data_dir) as server:
        filler = data_dir / "filler"
        try:
            with hostile_case("host data dir full", "min_free_disk_mib admission (507)") as case:
                case.sampler.data_dir, case.sampler.server_pid = data_dir, server.pid
                with server.client() as client:
                    running = server.create(client)
                    put_acknowledged(client, running, b"before the disk filled\n")
                    filled = fill(filler)
                    created = client.post("/v1/sandboxes", json={})
                    assert created.status_code == 507, created.text
                    assert created.json()["error"]["type"] == "StorageFull"
                    url = f"/v1/sandboxes/{running}"
                    put = client.put(f"{url}/files", params={"path": "/root/x"}, content=b"x")
                    assert put.status_code == 507, put.text
                    echo = client.post(f"{url}/exec", json={"cmd": "echo still"})
                    assert echo.json()["stdout"] == "still\n", echo.text
                    # A state write on the full disk: done, or a clear 507 (never a 500).
                    extended = client.post(f"{url}/timeout", json={"timeout_s": 600})
                    assert extended.status_code in (200, 507), extended.text
                    assert integrity(data_dir / "emberbox.db") == "ok"
                    bystander.check()
                    filler.unlink()
                    again = client.post("/v1/sandboxes", json={})
                    assert again.status_code == 201, again.text
                    put = client.put(f"{url}/files", params={"path": "/root/x"}, content=b"x")
                    assert put.status_code == 200, put.text
                    ack = client.get(f"{url}/files", params={"path": ACK_PATH})
                    assert ack.content == b"before the disk filled\n"
                    listing = client.get("/v1/sandboxes").json()["sandboxes"]
                    assert sorted(s["state"] for s in listing) == ["running", "running"]
                    # A guest writing while the host disk is full gets an I/O error
                    # (werror=report), instead of a VM that QEMU pauses for good.
                    fill(filler)
                    # Direct I/O: the error reaches dd itself, not the page cache's
                    # writeback (which retries in the background).
                    write = "dd if=/dev/zero of=/root/big bs=1M count=32 oflag=direct"
                    wrote = client.post(
                        f"{url}/exec", json={"cmd": f"{write} 2>&1; echo rc=$?", "timeout_s": 30}
                    )
                    assert wrote.status_code == 200, wrote.text
                    assert "Input/output error" in wrote.json()["stdout"], wrote.text
                    alive = client.post(f"{url}/exec", json={"cmd": "echo alive", "timeout_s": 10})
                    assert alive.json()["stdout"] == "alive\n", alive.text
                    filler.unlink()
                assert integrity(data_dir / "emberbox.db") == "ok"
                case.outcome = (
                    f"filled {filled >> 20} MiB: create/upload 507; exec ok; db ok; "
                    "guest write EIO, VM not paused"
                )
        finally:
            filler.unlink(missing_ok=True)


def test_sqlite_full_is_storage_full(tmp_path: Path) -> None:
    """SQLITE_FULL (here: PRAGMA max_page_count) is StorageFull, the failed write leaves
    the database intact, and writes work again once there is room."""
    from tests.support.rows import make_row

    async def main() -> None:
        store = await Store.open(tmp_path / "db.sqlite")
        try:
            pages = await store.call(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
            await store.call(lambda c: c.execute(f"PRAGMA max_page_count = {pages}"))
            await store.insert(make_row("first"))
            with pytest.raises(errors.StorageFull):
                for i in range(1000):
                    await store.insert(make_row(f"full{i:04d}"))
            with pytest.raises(errors.StorageFull):  # inside BEGIN IMMEDIATE ... COMMIT
                await store.update("first", error="x" * 100_000)
            assert (await store.get("first")).error is None  # type: ignore[union-attr]
            await store.call(lambda c: c.execute(f"PRAGMA max_page_count = {pages * 100}"))
            await store.update("first", error="y" * 100_000)  # no transaction left open
            await store.insert(make_row("roomagain00"))
            assert await store.get("roomagain00") is not None
        finally:
            await store.close()

    anyio.run(main)
    assert integrity(tmp_path / "db.sqlite") == "ok"
