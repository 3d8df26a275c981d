"""Files over HTTP: writes, reads, listings, stat, mkdir, remove, archives and the upload
limit."""

from __future__ import annotations

import io
import tarfile
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.support.api_calls import UPLOAD_LIMIT, error_message, new_sandbox, start_process
from tests.support.archives import tar_of
from tests.support.fakes_manager import FakeManager

pytestmark = pytest.mark.anyio


async def test_file_round_trip_listing_and_stat(
    client: httpx.AsyncClient, manager: FakeManager
) -> None:
    """PUT writes the raw body (through a temp name, renamed into place), GET reads it
    back as bytes; a directory answers its JSON listing; paths are the guest's."""
    sandbox_id = await new_sandbox(client)
    files = f"/v1/sandboxes/{sandbox_id}/files"
    data = bytes(range(256)) * 8
    put = await client.put(files, params={"path": "tmp/../tmp/a.bin", "mode": "600"}, content=data)
    assert put.json() == {"path": "tmp/../tmp/a.bin", "size": len(data)}
    guest = manager.guests[sandbox_id]
    assert guest.files["/tmp/a.bin"] == data
    assert guest.modes["/tmp/a.bin"] == 0o600
    assert [c.split()[0] for c in guest.calls] == ["write", "rename"]
    got = await client.get(files, params={"path": "/tmp/a.bin"})
    assert (got.status_code, got.content) == (200, data)
    assert got.headers["content-type"] == "application/octet-stream"
    listing = (await client.get(files, params={"path": "/tmp"})).json()
    assert listing["path"] == "/tmp"
    assert [(e["name"], e["type"], e["size"], e["mode"]) for e in listing["entries"]] == [
        ("a.bin", "file", len(data), 0o600)
    ]
    again = await client.put(files, params={"path": "/tmp/a.bin"}, content=b"new")
    assert again.status_code == 200
    assert guest.modes["/tmp/a.bin"] == 0o600  # an existing file keeps its mode
    stat = (await client.get(f"{files}/stat", params={"path": "/tmp/a.bin"})).json()
    assert (stat["type"], stat["size"]) == ("file", 3)
    assert sorted(guest.files) == ["/etc/hostname", "/tmp/a.bin"]  # no temp file left


async def test_file_refusals(client: httpx.AsyncClient) -> None:
    """Missing paths are 404; a directory is not a file (400); bad modes and paths 422."""
    sandbox_id = await new_sandbox(client)
    files = f"/v1/sandboxes/{sandbox_id}/files"
    error_message(await client.get(files, params={"path": "/nope"}), 404, "NotFound")
    error_message(await client.get(f"{files}/stat", params={"path": "/nope"}), 404, "NotFound")
    error_message(
        await client.put(files, params={"path": "/no/dir/x"}, content=b"x"), 404, "NotFound"
    )
    error_message(
        await client.put(files, params={"path": "/tmp"}, content=b"x"), 400, "InvalidRequest"
    )
    error_message(
        await client.put(files, params={"path": "/tmp/"}, content=b"x"), 400, "InvalidRequest"
    )
    error_message(
        await client.put(files, params={"path": "/tmp/x", "mode": "999"}), 422, "ValidationError"
    )
    error_message(await client.get(files, params={"path": ""}), 422, "ValidationError")
    error_message(await client.get(files), 422, "ValidationError")
    error_message(await client.get(files, params={"path": "a\x00b"}), 422, "ValidationError")
    error_message(await client.delete(files, params={"path": "/nope"}), 404, "NotFound")


async def test_mkdir_remove_and_recursive(client: httpx.AsyncClient, manager: FakeManager) -> None:
    """mkdir makes parents; remove refuses a full directory unless recursive."""
    sandbox_id = await new_sandbox(client)
    files = f"/v1/sandboxes/{sandbox_id}/files"
    made = await client.post(f"{files}/mkdir", json={"path": "/srv/a/b"})
    assert made.status_code == 204
    await client.put(files, params={"path": "/srv/a/b/f"}, content=b"x")
    error_message(await client.delete(files, params={"path": "/srv"}), 400, "InvalidRequest")
    gone = await client.delete(files, params={"path": "/srv", "recursive": "true"})
    assert gone.status_code == 204
    assert "/srv/a/b/f" not in manager.guests[sandbox_id].files
    body = {"path": "/x/y", "parents": False}
    error_message(await client.post(f"{files}/mkdir", json=body), 404, "NotFound")


async def test_upload_limit_is_413_before_anything_is_stored(
    client: httpx.AsyncClient, manager: FakeManager
) -> None:
    """Past max_upload_bytes: 413 up front with a Content-Length, or once counted for a
    chunked body; the old file stays, no temp file is left."""
    sandbox_id = await new_sandbox(client)
    files = f"/v1/sandboxes/{sandbox_id}/files"
    guest = manager.guests[sandbox_id]
    await client.put(files, params={"path": "/tmp/keep"}, content=b"old")
    big = b"x" * (UPLOAD_LIMIT + 1)
    response = await client.put(files, params={"path": "/tmp/keep"}, content=big)
    assert "max_upload_bytes" in error_message(response, 413, "PayloadTooLarge")
    assert len(guest.calls) == 2  # the first upload's write and rename: nothing since

    async def chunked() -> AsyncIterator[bytes]:
        for _ in range(UPLOAD_LIMIT // 1000 + 2):
            yield b"y" * 1000

    response = await client.put(files, params={"path": "/tmp/keep"}, content=chunked())
    error_message(response, 413, "PayloadTooLarge")
    assert guest.files["/tmp/keep"] == b"old"
    assert sorted(guest.files) == ["/etc/hostname", "/tmp/keep"]
    archive = f"/v1/sandboxes/{sandbox_id}/archive"
    error_message(
        await client.put(archive, params={"path": "/a"}, content=big), 413, "PayloadTooLarge"
    )
    pid = await start_process(client, sandbox_id, cmd="cat")
    stdin = f"/v1/sandboxes/{sandbox_id}/processes/{pid}/stdin"
    error_message(await client.post(stdin, content=big), 413, "PayloadTooLarge")


async def test_archive_in_and_out(client: httpx.AsyncClient, manager: FakeManager) -> None:
    """PUT /archive extracts a tar into a directory; GET /archive streams one back; a
    member climbing out with .. is refused (400)."""
    sandbox_id = await new_sandbox(client)
    archive = f"/v1/sandboxes/{sandbox_id}/archive"
    body = tar_of({"a.txt": b"A", "sub/b.txt": b"B"})
    put = await client.put(archive, params={"path": "/srv/app"}, content=body)
    assert put.json() == {"path": "/srv/app", "entries": 2}
    assert manager.guests[sandbox_id].files["/srv/app/sub/b.txt"] == b"B"
    got = await client.get(archive, params={"path": "/srv/app"})
    assert got.headers["content-type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(got.content)) as tar:
        names = {m.name: m for m in tar.getmembers()}
        assert {"a.txt", "sub", "sub/b.txt"} <= set(names)
        extracted = tar.extractfile(names["sub/b.txt"])
        assert extracted is not None
        assert extracted.read() == b"B"
    bad = tar_of({"../../etc/evil": b"x"})
    error_message(
        await client.put(archive, params={"path": "/srv"}, content=bad), 400, "InvalidRequest"
    )
    error_message(await client.get(archive, params={"path": "/nope"}), 404, "NotFound")
