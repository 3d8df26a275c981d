"""The unmodified async E2B SDK and the code interpreter (``e2b-code-interpreter``
2.11.5) against a real ``emberbox serve``: async commands and files, run_code state
across calls, errors, contexts. One server and one sandbox for the module."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from e2b import (
    AsyncSandbox,
    CommandExitException,
    FilesystemEvent,
    PtySize,
    SandboxQuery,
    SandboxState,
)
from e2b.exceptions import SandboxException
from e2b_code_interpreter import Sandbox

from emberbox.images.registry import ImageInfo
from tests.support.e2b import E2bServer, e2b_server
from tests.support.paths import short_tmp_dir

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def front(default_image: ImageInfo) -> Iterator[E2bServer]:
    data_dir = short_tmp_dir("eb-e2bi-")
    try:
        with e2b_server(data_dir) as running:
            yield running
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def sbx(front: E2bServer) -> Iterator[Sandbox]:
    sandbox = Sandbox.create()
    yield sandbox
    sandbox.kill()


def test_run_code_keeps_state(sbx: Sandbox) -> None:
    """Variables and imports persist; stdout streams; the last value is the result."""
    seen: list[str] = []
    first = sbx.run_code(
        "import math\nx = 41\nprint('hi')\nx + 1", on_stdout=lambda m: seen.append(m.line)
    )
    assert first.text == "42" and first.logs.stdout == ["hi\n"] and first.error is None
    assert seen == ["hi\n"]
    assert sbx.run_code("math.floor(x + 0.5)").text == "41"
    assert sbx.run_code("import sys; print('e', file=sys.stderr)").logs.stderr == ["e\n"]


def test_run_code_error(sbx: Sandbox) -> None:
    """An exception is the execution's error: name, value and traceback."""
    failed = sbx.run_code("1/0")
    assert failed.error is not None
    assert (failed.error.name, failed.error.value) == ("ZeroDivisionError", "division by zero")
    assert "ZeroDivisionError" in failed.error.traceback


def test_contexts(sbx: Sandbox) -> None:
    """Contexts are separate namespaces; restart clears one; remove deletes it."""
    ctx = sbx.create_code_context(cwd="/tmp")
    assert ctx.cwd == "/tmp" and ctx.id in [c.id for c in sbx.list_code_contexts()]
    sbx.run_code("y = 5", context=ctx)
    assert sbx.run_code("y", context=ctx).text == "5"
    assert sbx.run_code("import os; os.getcwd()", context=ctx).text == "'/tmp'"
    missing = sbx.run_code("y")  # the default context has no y
    assert missing.error is not None and missing.error.name == "NameError"
    sbx.restart_code_context(ctx)
    again = sbx.run_code("y", context=ctx)
    assert again.error is not None and again.error.name == "NameError"
    sbx.remove_code_context(ctx)
    assert ctx.id not in [c.id for c in sbx.list_code_contexts()]


@pytest.mark.anyio
async def test_async_sdk(front: E2bServer, sbx: Sandbox) -> None:
    """AsyncSandbox connects to the same sandbox: commands, files, background."""
    del front
    box = await AsyncSandbox.connect(sbx.sandbox_id)
    result = await box.commands.run("echo $((6*7))")
    assert result.stdout == "42\n"
    with pytest.raises(CommandExitException):
        await box.commands.run("exit 3")
    await box.files.write("async.txt", "a")
    assert await box.files.read("async.txt") == "a"
    assert [e.name for e in await box.files.list(".") if e.name == "async.txt"] == ["async.txt"]
    events = []
    handle = await box.files.watch_dir(".", on_event=events.append)
    await box.files.write("seen.txt", "b")
    await box.commands.run("sleep 1")
    await handle.stop()
    assert any(e.name == "seen.txt" for e in events)
    background = await box.commands.run("sleep 30", background=True)
    assert await box.commands.kill(background.pid) is True
    assert await box.is_running()


@pytest.mark.anyio
async def test_async_pty_stdin_and_envd_063(front: E2bServer, sbx: Sandbox) -> None:
    """The async SDK: a PTY (resize reaches the terminal), stdin to a background
    command, /files as the user (403 for a root-only file), upload metadata, gzip
    reads and watch events with their entry (envd 0.6.3)."""
    del front
    box = await AsyncSandbox.connect(sbx.sandbox_id)
    seen = bytearray()
    terminal = await box.pty.create(PtySize(rows=24, cols=80), on_data=seen.extend)
    await box.pty.resize(terminal.pid, PtySize(rows=30, cols=100))
    await box.pty.send_stdin(terminal.pid, b"stty size; exit\n")
    await terminal.wait()
    assert b"30 100" in seen

    cat = await box.commands.run("cat", background=True, stdin=True)
    await box.commands.send_stdin(cat.pid, "hey\n")
    await box.commands.close_stdin(cat.pid)
    assert (await cat.wait()).stdout == "hey\n"

    await box.commands.run("echo s > /tmp/a-root && chmod 600 /tmp/a-root", user="root")
    with pytest.raises(SandboxException, match="403"):
        await box.files.read("/tmp/a-root")
    assert await box.files.read("/tmp/a-root", user="root") == "s\n"
    written = await box.files.write("am.txt", "x" * 100, metadata={"Tag": "t1"})
    assert written.metadata == {"tag": "t1"}
    assert (await box.files.get_info("am.txt")).metadata == {"tag": "t1"}
    assert await box.files.read("am.txt", gzip=True) == "x" * 100

    events: list[FilesystemEvent] = []
    await box.files.make_dir("a-watched")
    handle = await box.files.watch_dir("a-watched", on_event=events.append, include_entry=True)
    await box.files.write("a-watched/ent.txt", "123")
    await box.commands.run("sleep 1")
    await handle.stop()
    entries = [e.entry for e in events if e.name == "ent.txt" and e.entry is not None]
    assert entries and entries[-1].size == 3 and entries[-1].owner == "user"


@pytest.mark.anyio
async def test_async_control_plane(front: E2bServer) -> None:
    """AsyncSandbox's control plane: create with metadata, get_info, list by metadata,
    set_timeout moves endAt, kill; a killed sandbox is not running."""
    del front
    box = await AsyncSandbox.create(metadata={"suite": "async"}, timeout=60)
    try:
        info = await box.get_info()
        assert info.metadata == {"suite": "async"} and info.state == SandboxState.RUNNING
        pages = AsyncSandbox.list(query=SandboxQuery(metadata={"suite": "async"}))
        assert [s.sandbox_id for s in await pages.next_items()] == [box.sandbox_id]
        await box.set_timeout(600)
        assert (await box.get_info()).end_at > info.end_at
        assert (await box.commands.run("id -un")).stdout == "user\n"
    finally:
        assert await box.kill() is True
    assert not await box.is_running()
    assert await AsyncSandbox.kill(box.sandbox_id) is False
