"""The unmodified E2B SDK (sync, ``e2b==2.63.0``) against a real ``emberbox serve``
through its E2B front: control plane, commands, files, watchers, pause/connect and
tenancy. One server and few sandboxes for the whole module."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import time
from collections.abc import Iterator

import httpx
import pytest
from e2b import (
    CommandExitException,
    FilesystemEventType,
    NotFoundException,
    Sandbox,
    SandboxQuery,
    SandboxState,
    TimeoutException,
)
from e2b.exceptions import (
    AuthenticationException,
    InvalidArgumentException,
    SandboxException,
)
from e2b.sandbox.filesystem.filesystem import WriteEntry

from emberbox.images.registry import ImageInfo
from emberbox.sdk import Sandbox as EmberboxSandbox
from tests.support.e2b import E2bServer, e2b_server
from tests.support.paths import short_tmp_dir

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def front(default_image: ImageInfo) -> Iterator[E2bServer]:
    data_dir = short_tmp_dir("eb-e2b-")
    try:
        with e2b_server(data_dir) as running:
            yield running
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def sbx(front: E2bServer) -> Iterator[Sandbox]:
    sandbox = Sandbox.create(metadata={"suite": "e2b", "who": "a b&c"}, envs={"FROM_CREATE": "1"})
    yield sandbox
    sandbox.kill()


def test_commands_run(sbx: Sandbox) -> None:
    """stdout, stderr, exit codes, env (create's and the call's), cwd and users."""
    result = sbx.commands.run("echo out; echo err >&2; echo $FROM_CREATE $MINE", envs={"MINE": "m"})
    assert (result.stdout, result.stderr, result.exit_code) == ("out\n1 m\n", "err\n", 0)
    with pytest.raises(CommandExitException) as raised:
        sbx.commands.run("echo bad >&2; exit 7")
    assert raised.value.exit_code == 7 and raised.value.stderr == "bad\n"
    assert sbx.commands.run("id -un; pwd").stdout == "user\n/home/user\n"
    assert sbx.commands.run("id -un; echo $HOME", user="root").stdout == "root\n/root\n"
    assert sbx.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    assert sbx.commands.run("sudo -n id -u").stdout == "0\n"
    assert sbx.commands.run("cat", stdin=False).stdout == ""


def test_commands_run_in_a_static_bash_with_a_utf8_locale(sbx: Sandbox) -> None:
    """The image's bash is bash-static (docs/images.md) and C.UTF-8 comes from its locale
    archive: bash counts `é` as one character and `locale` complains of nothing. A cwd
    `user` may not enter fails the Start (InvalidArgumentException), as in E2B."""
    linked = sbx.commands.run("ldd /usr/bin/bash 2>&1 || true").stdout
    assert "not a dynamic executable" in linked
    shown = sbx.commands.run("s=é; echo $LANG ${#s}; locale 2>&1 >/dev/null | wc -c")
    assert shown.stdout == "C.UTF-8 1\n0\n"
    with pytest.raises(InvalidArgumentException, match="Permission denied"):
        sbx.commands.run("true", cwd="/root")
    assert sbx.commands.run("pwd", cwd="/root", user="root").stdout == "/root\n"


def test_the_agent_switches_to_user(front: E2bServer, sbx: Sandbox) -> None:
    """`user`'s commands run as uid 1000 with user's own group only, cannot read root's
    files, and are the SDK's bash itself, switched by the guest agent (no setpriv
    wrapper in the process's command line); user="root" stays root."""
    ids = sbx.commands.run("id -u; id -g; id -G; id -Gn; grep NoNewPrivs /proc/self/status")
    assert ids.stdout.split("\n")[:5] == ["1000", "1000", "1000", "user", "NoNewPrivs:\t0"]
    # vforked by an agent thread that took these ids (saved ones included) and gave up
    # every capability, as a setreuid would have left them
    status = sbx.commands.run("grep -E '^(Uid|Gid|CapPrm|CapEff):' /proc/self/status").stdout
    no_caps = ["CapPrm:", "0" * 16, "CapEff:", "0" * 16]
    assert status.split() == ["Uid:", *["1000"] * 4, "Gid:", *["1000"] * 4, *no_caps]
    sbx.commands.run("echo s > /tmp/runas-secret && chmod 600 /tmp/runas-secret", user="root")
    with pytest.raises(CommandExitException) as raised:
        sbx.commands.run("cat /tmp/runas-secret")
    assert raised.value.exit_code == 1 and "Permission denied" in raised.value.stderr
    assert sbx.commands.run("id -u; cat /tmp/runas-secret", user="root").stdout == "0\ns\n"
    handle = sbx.commands.run("sleep 60", background=True)
    try:
        native = EmberboxSandbox.connect(sbx.sandbox_id, url=front.server.url, api_key=front.key)
        try:  # (not `with`: that would kill the sandbox)
            shown = {p.pid: p.cmd for p in native.commands.list()}
        finally:
            native.close()
        assert shown[handle.pid] == "/bin/bash -l -c 'sleep 60'"
        owner = sbx.commands.run(f"stat -c %u /proc/{handle.pid}", user="root").stdout
        assert owner == "1000\n"
    finally:
        handle.kill()


def test_command_timeout(sbx: Sandbox) -> None:
    """A command past its timeout raises TimeoutException and is killed."""
    with pytest.raises(TimeoutException):
        sbx.commands.run("sleep 30; touch /tmp/survived", timeout=2)
    time.sleep(1)
    assert not sbx.files.exists("/tmp/survived")


def test_background_commands(sbx: Sandbox) -> None:
    """A background process has a real pid; stdin, connect, list and kill reach it."""
    handle = sbx.commands.run("cat", background=True, stdin=True)
    assert sbx.commands.run(f"kill -0 {handle.pid}", user="root").exit_code == 0
    assert handle.pid in [p.pid for p in sbx.commands.list()]
    sbx.commands.send_stdin(handle.pid, "abc\n")
    sbx.commands.close_stdin(handle.pid)
    assert handle.wait().stdout == "abc\n"
    sleeper = sbx.commands.run("echo started; sleep 60", background=True)
    again = sbx.commands.connect(sleeper.pid)
    assert sbx.commands.kill(sleeper.pid) is True
    with pytest.raises(CommandExitException):
        again.wait()
    assert sbx.commands.kill(sleeper.pid) is False


def test_files(sbx: Sandbox) -> None:
    """write/read/list(depth)/make_dir/remove/rename/exists/get_info, odd names."""
    path = "/home/user/dir one/ünï cødé.txt"
    info = sbx.files.write(path, "hello")
    assert info.path == path and sbx.files.read(path) == "hello"
    entry = sbx.files.get_info(path)
    assert (entry.owner, entry.mode, entry.permissions) == ("user", 0o644, "-rw-r--r--")
    assert sbx.files.make_dir("rel/a/b") is True and sbx.files.make_dir("rel/a/b") is False
    sbx.files.write("rel/a/f.txt", b"x")
    names = [e.path for e in sbx.files.list("/home/user/rel", depth=3)]
    assert names == ["/home/user/rel/a", "/home/user/rel/a/b", "/home/user/rel/a/f.txt"]
    moved = sbx.files.rename("rel/a/f.txt", "rel/g.txt")
    assert moved.path == "/home/user/rel/g.txt" and sbx.files.exists("rel/g.txt")
    sbx.files.remove("rel")
    assert not sbx.files.exists("rel") and not sbx.files.exists("/nope")
    sbx.files.remove("/nope")  # a missing path is fine
    with pytest.raises(NotFoundException):
        sbx.files.read("/home/user/missing")
    with pytest.raises(NotFoundException):
        sbx.files.list("/home/user/missing")


def test_uploads(sbx: Sandbox) -> None:
    """write_files (multipart), file-like, binary and a 50 MiB round trip."""
    written = sbx.files.write_files(
        [WriteEntry(path="m/one.txt", data="1"), WriteEntry(path="/tmp/two.bin", data=b"\0\1")]
    )
    assert [w.path for w in written] == ["/home/user/m/one.txt", "/tmp/two.bin"]
    assert sbx.files.read("/tmp/two.bin", format="bytes") == b"\0\1"
    sbx.files.write("like.txt", io.BytesIO(b"from a file object"))
    assert sbx.files.read("like.txt") == "from a file object"
    blob = os.urandom(50 * 1024 * 1024)
    sbx.files.write("big.bin", blob)
    assert (
        hashlib.sha256(sbx.files.read("big.bin", format="bytes")).digest()
        == hashlib.sha256(blob).digest()
    )
    sbx.files.remove("big.bin")


def test_gzip_upload(front: E2bServer, sbx: Sandbox) -> None:
    """An octet-stream upload with Content-Encoding: gzip is inflated."""
    headers = {
        "E2b-Sandbox-Id": sbx.sandbox_id,
        "X-Access-Token": _token(sbx),
        "Content-Type": "application/octet-stream",
        "Content-Encoding": "gzip",
    }
    answer = httpx.post(
        f"{front.sandbox_url}/files",
        params={"path": "z.txt"},
        content=gzip.compress(b"zipped"),
        headers=headers,
    )
    assert answer.status_code == 200, answer.text
    assert sbx.files.read("z.txt") == "zipped"


def test_watch_dir(sbx: Sandbox) -> None:
    """watch_dir sees a write in the directory it watches."""
    sbx.files.make_dir("watched")
    watcher = sbx.files.watch_dir("watched")
    sbx.files.write("watched/new.txt", "x")
    time.sleep(1)
    events = watcher.get_new_events()
    watcher.stop()
    assert any(e.name == "new.txt" and e.type == FilesystemEventType.WRITE for e in events)


def test_control_plane(front: E2bServer, sbx: Sandbox) -> None:
    """get_info, list with a metadata filter and paging, and a stable endAt."""
    info = sbx.get_info()
    assert info.metadata == {"suite": "e2b", "who": "a b&c"} and info.template_id == "base"
    assert info.end_at == sbx.get_info().end_at
    found = Sandbox.list(query=SandboxQuery(metadata={"who": "a b&c"})).next_items()
    assert [s.sandbox_id for s in found] == [sbx.sandbox_id]
    assert Sandbox.list(query=SandboxQuery(metadata={"who": "x"})).next_items() == []
    other = Sandbox.create(metadata={"suite": "e2b"})
    try:
        pages = Sandbox.list(query=SandboxQuery(metadata={"suite": "e2b"}), limit=1)
        first = pages.next_items()
        assert pages.has_next and len(first) == 1
        second = pages.next_items()
        assert not pages.has_next
        assert {first[0].sandbox_id, second[0].sandbox_id} == {sbx.sandbox_id, other.sandbox_id}
        assert first[0].sandbox_id == other.sandbox_id  # newest first
    finally:
        assert other.kill() is True
    assert Sandbox.kill(other.sandbox_id) is False


def test_tenancy_and_tokens(front: E2bServer, sbx: Sandbox) -> None:
    """Another tenant sees the sandbox as unknown; a wrong envd token is 401."""
    with pytest.raises(NotFoundException):
        Sandbox.get_info(sbx.sandbox_id, api_key=front.other_key)
    assert Sandbox.kill(sbx.sandbox_id, api_key=front.other_key) is False
    with pytest.raises(SandboxException):
        Sandbox.connect(sbx.sandbox_id, api_key=front.other_key)
    assert Sandbox.list(api_key=front.other_key).next_items() == []
    with pytest.raises(AuthenticationException):
        Sandbox.list(api_key="e2b_" + "0" * 76).next_items()
    headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "X-Access-Token": "wrong"}
    assert httpx.get(f"{front.sandbox_url}/health", headers=headers).status_code == 401
    headers["X-Access-Token"] = _token(sbx)
    assert httpx.get(f"{front.sandbox_url}/health", headers=headers).status_code == 204
    native = httpx.get(
        f"{front.server.url}/v1/sandboxes/{sbx.sandbox_id}",
        headers={"Authorization": f"Bearer {front.key}"},
    )
    assert native.status_code == 200 and "emberbox.e2b" not in native.json()["metadata"]
    assert _token(sbx) not in native.text
    unknown = httpx.get(f"{front.sandbox_url}/health", headers={"E2b-Sandbox-Id": "abc123"})
    assert unknown.status_code == 502 and "was not found" in unknown.json()["message"]


def test_pause_connect_and_expiry(front: E2bServer) -> None:
    """pause then connect keeps files and processes; set_timeout ends a sandbox; a
    sandbox killed mid-command raises the SDK's not-running error."""
    box = Sandbox.create()
    box.files.write("kept.txt", "kept")
    sleeper = box.commands.run("sleep 600", background=True)
    assert box.pause() is True
    assert Sandbox.get_info(box.sandbox_id).state == SandboxState.PAUSED
    resumed = Sandbox.connect(box.sandbox_id)
    assert resumed.files.read("kept.txt") == "kept"
    assert resumed.commands.run(f"kill -0 {sleeper.pid}").exit_code == 0
    resumed.set_timeout(5)
    time.sleep(8)
    assert not resumed.is_running()
    assert Sandbox.kill(box.sandbox_id) is False

    doomed = Sandbox.create()
    handle = doomed.commands.run("sleep 120", background=True)
    Sandbox.kill(doomed.sandbox_id)
    with pytest.raises(SandboxException, match=r"not running|killed|end of life"):
        handle.wait()


def _token(sbx: Sandbox) -> str:
    token = sbx._envd_access_token
    assert isinstance(token, str)
    return token


def test_files_act_as_the_user(sbx: Sandbox) -> None:
    """/files reads and writes as the requested user: a root-only file is refused to
    `user` (403) and read by root; `user` cannot write into /etc, root can."""
    sbx.commands.run("echo secret > /tmp/root-only && chmod 600 /tmp/root-only", user="root")
    with pytest.raises(SandboxException, match="403"):
        sbx.files.read("/tmp/root-only")
    assert sbx.files.read("/tmp/root-only", user="root") == "secret\n"
    sbx.commands.run("ln -sfn /tmp/root-only link-to-secret && ln -sfn /nope dangling")
    with pytest.raises(SandboxException, match="403"):
        sbx.files.read("link-to-secret")
    with pytest.raises(NotFoundException):
        sbx.files.read("dangling")
    with pytest.raises(SandboxException, match="403"):
        sbx.files.write("/etc/by-user.conf", "x")
    with pytest.raises(SandboxException, match="403"):
        sbx.files.write("/root/deep/by-user.txt", "x")
    assert not sbx.files.exists("/etc/by-user.conf", user="root")
    sbx.files.write("/etc/by-root.conf", "y", user="root")
    owner = sbx.files.get_info("/etc/by-root.conf").owner
    mine = sbx.files.write_files([WriteEntry(path="owned/a.txt", data="a")])[0]
    assert (owner, sbx.files.get_info(mine.path).owner) == ("root", "user")
    assert sbx.files.get_info("owned").owner == "user"  # parents made as the user


def test_metadata_gzip_and_watch_entries(front: E2bServer, sbx: Sandbox) -> None:
    """envd 0.6.3's features: upload metadata (X-Metadata-*) read back in EntryInfo,
    gzip both ways through the SDK, and watch events that carry their entry."""
    assert sbx.get_info().envd_version == "0.6.3"
    written = sbx.files.write("meta.txt", "m", metadata={"Owner": "alice", "k": "v 1"})
    assert written.metadata == {"owner": "alice", "k": "v 1"}
    assert sbx.files.get_info("meta.txt").metadata == {"owner": "alice", "k": "v 1"}
    assert [e.metadata for e in sbx.files.list(".") if e.name == "meta.txt"] == [
        {"owner": "alice", "k": "v 1"}
    ]
    sbx.files.write("plain.txt", "p")
    assert sbx.files.get_info("plain.txt").metadata is None
    text = "zipped both ways " * 1000
    sbx.files.write("gz.txt", text, gzip=True)
    assert sbx.files.read("gz.txt", gzip=True) == text
    headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "X-Access-Token": _token(sbx)}
    url, params = f"{front.sandbox_url}/files", {"path": "gz.txt"}
    with httpx.stream("GET", url, params=params, headers=headers) as zipped:
        raw = b"".join(zipped.iter_raw())
    assert zipped.headers["content-encoding"] == "gzip" and gzip.decompress(raw) == text.encode()
    assert len(raw) < len(text) // 10
    plain = httpx.get(url, params=params, headers={**headers, "Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers and plain.text == text
    noise = os.urandom(100_000)  # incompressible: sent as it is, though gzip is offered
    sbx.files.write("noise.bin", noise)
    raw_noise = httpx.get(url, params={"path": "noise.bin"}, headers=headers)
    assert "content-encoding" not in raw_noise.headers and raw_noise.content == noise

    sbx.files.make_dir("watched-entries")
    watcher = sbx.files.watch_dir("watched-entries", include_entry=True)
    sbx.files.write("watched-entries/e.txt", "12345")
    time.sleep(1)
    events = watcher.get_new_events()
    watcher.stop()
    writes = [e for e in events if e.name == "e.txt" and e.type == FilesystemEventType.WRITE]
    assert writes and writes[-1].entry is not None
    assert (writes[-1].entry.path, writes[-1].entry.size) == ("/home/user/watched-entries/e.txt", 5)


def test_envd_calls_are_audited_and_rate_limited(front: E2bServer, sbx: Sandbox) -> None:
    """envd calls (no API key) are audited as the sandbox's tenant and creating key,
    never with the access token, and spend that key's rate limit: once envd calls have
    used it up, the key's control-plane calls get 429 too. (Last: it drains alice's
    bucket, which refills in seconds.)"""
    sbx.commands.run("echo audited")
    sbx.files.write("audited.txt", "a")
    with front.server.client() as admin:
        answer = admin.get("/v1/audit", params={"tenant": "alice", "limit": 1000})
    assert answer.status_code == 200, answer.text
    assert _token(sbx) not in answer.text
    entries = answer.json()["entries"]
    mine = [e for e in entries if e["target_id"] == sbx.sandbox_id and e["outcome"] == "ok"]
    actions = {e["action"] for e in mine}
    assert {"e2b.sandbox.create", "e2b.process.start", "e2b.file.write"} <= actions
    start = next(e for e in mine if e["action"] == "e2b.process.start")
    assert start["detail"]["cmd"][-1] == "echo audited" and start["detail"]["via"] == "envd"
    creator = next(e for e in mine if e["action"] == "e2b.sandbox.create")["key_id"]
    assert creator is not None and start["key_id"] == creator

    headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "X-Access-Token": _token(sbx)}
    with httpx.Client(timeout=30) as client:
        statuses = []
        for _ in range(2000):
            status = client.get(f"{front.sandbox_url}/health", headers=headers).status_code
            statuses.append(status)
            if status == 429:
                break
        assert statuses[-1] == 429 and set(statuses[:-1]) == {204}
        # The bucket refills at 20/s, so a slow host may let a call or two through
        # before the next refusal; a separate control-plane bucket (burst 100) would
        # let all 50 through.
        control = []
        for _ in range(50):
            answer = client.get(
                f"{front.api_url}/sandboxes/{sbx.sandbox_id}", headers={"X-API-KEY": front.key}
            )
            control.append(answer.status_code)
            if answer.status_code == 429:
                break
        assert control[-1] == 429 and set(control[:-1]) <= {200}, control
    time.sleep(2)  # some of the bucket back for the module's clean-up
