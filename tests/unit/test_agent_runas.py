"""Commands as another user: the agent's own switch (``user`` on exec and spawn, run by
the real agent on the host) and the host's fallback for agents that cannot (a fake
agent whose hello lists no features)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from emberbox import errors
from emberbox.agent_client.client import AgentClient, ExecSpec, SpawnSpec
from emberbox.agent_client.spec import RunAs
from emberbox.guest import cgroups, commands, protocol, runas
from tests.support.agent import RunningAgent, running_agent

pytestmark = pytest.mark.anyio

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


@pytest.fixture
def agent() -> Iterator[RunningAgent]:
    with running_agent() as started:
        yield started


@pytest.fixture
def files() -> Iterator[Path]:
    """A directory anyone may enter: `public` (0644), `secret` (0600) and `private.sh`
    (0700), all root's."""
    root = Path(tempfile.mkdtemp(prefix="eb-runas-"))
    try:
        root.chmod(0o755)
        for name, text, mode in [
            ("public", "anyone", 0o644),
            ("secret", "root only", 0o600),
            ("private.sh", "#!/bin/sh\necho ran\n", 0o700),
        ]:
            (root / name).write_text(text)
            (root / name).chmod(mode)
        yield root
    finally:
        shutil.rmtree(root)


def group_members() -> dict[str, list[int]]:
    return runas.parse_group_members(Path("/etc/group").read_text())


@pytest.fixture
async def client(agent: RunningAgent) -> AsyncIterator[AgentClient]:
    async with await agent.connect() as connected:
        await connected.handshake(timeout_s=10)
        yield connected


async def test_hello_lists_the_user_feature(client: AgentClient) -> None:
    """The agent says it switches users itself, and the client takes note."""
    assert protocol.FEATURE_USER in client.features
    assert client.switches_user


@as_root
async def test_exec_as_another_user(client: AgentClient) -> None:
    """uid, gid and (without a name) no supplementary groups, as `setpriv --clear-groups`."""
    result = await client.exec(ExecSpec("id -u; id -g; id -G", user=RunAs(NOBODY, NOBODY)))
    assert result.exit_code == 0, result.stderr
    assert result.stdout.decode().split() == [str(NOBODY)] * 3


@as_root
async def test_named_user_gets_its_groups(client: AgentClient) -> None:
    """With a name: the gid and every /etc/group entry that lists the name (initgroups)."""
    members = group_members()
    name = next(iter(sorted(members)), "nobody")
    result = await client.exec(ExecSpec(["id", "-G"], user=RunAs(NOBODY, 4242, name)))
    assert result.exit_code == 0, result.stderr
    assert sorted(map(int, result.stdout.split())) == sorted({4242, *members.get(name, [])})


@as_root
async def test_user_cannot_read_roots_file(client: AgentClient, files: Path) -> None:
    nobody = RunAs(NOBODY, NOBODY)
    public = await client.exec(ExecSpec(["cat", str(files / "public")], user=nobody))
    secret = await client.exec(ExecSpec(["cat", str(files / "secret")], user=nobody))
    as_root_ = await client.exec(ExecSpec(["cat", str(files / "secret")]))
    assert (public.exit_code, public.stdout) == (0, b"anyone")
    assert secret.exit_code == 1 and b"Permission denied" in secret.stderr
    assert (as_root_.exit_code, as_root_.stdout) == (0, b"root only")


@as_root
async def test_no_new_privs_when_asked(client: AgentClient) -> None:
    script = "grep NoNewPrivs /proc/self/status"
    asked = await client.exec(ExecSpec(script, user=RunAs(NOBODY, NOBODY, no_new_privs=True)))
    plain = await client.exec(ExecSpec(script, user=RunAs(NOBODY, NOBODY)))
    assert asked.stdout.split() == [b"NoNewPrivs:", b"1"]
    assert plain.stdout.split() == [b"NoNewPrivs:", b"0"]


@as_root
async def test_spawn_on_a_terminal_as_another_user(client: AgentClient) -> None:
    """The child takes its terminal while still root, then its user."""
    spec = SpawnSpec("id -u; tty", pty=(80, 24), user=RunAs(NOBODY, NOBODY))
    pid = await client.spawn(spec)
    chunks: list[bytes] = []
    status = await client.attach(pid, on_stdout=chunks.append)
    lines = b"".join(chunks).decode().split()
    assert status.exit_code == 0
    assert lines[0] == str(NOBODY) and lines[1].startswith("/dev/pts/")


@as_root
async def test_a_program_the_user_may_not_run_is_126(client: AgentClient, files: Path) -> None:
    private = ExecSpec([str(files / "private.sh")])
    denied = await client.exec(dataclasses.replace(private, user=RunAs(NOBODY, NOBODY)))
    ran = await client.exec(private)
    assert denied.exit_code == 126 and b"ran" not in denied.stdout
    assert (ran.exit_code, ran.stdout) == (0, b"ran\n")


class JoinRecorder:
    """Stands for a cgroup: records, in the child, who joins it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def join(self) -> None:
        self.path.write_text(f"{os.geteuid()} {os.getegid()}")


@as_root
@pytest.mark.parametrize("no_new_privs", [False, True])
def test_a_command_with_a_cgroup_joins_it_as_root(files: Path, no_new_privs: bool) -> None:
    """Joining a cgroup needs root: with one, the switch comes after the join (in the
    preexec_fn, not Popen's own, which would come first)."""
    recorder = JoinRecorder(files / "joined")
    request: dict[str, Any] = {
        "argv": ["sh", "-c", "id -u; id -G; grep NoNewPrivs /proc/self/status"],
        "user": {"uid": NOBODY, "gid": NOBODY, "no_new_privs": no_new_privs},
    }
    cmd = commands.parse_command(request)
    group = cast(cgroups.Group, recorder)
    popen, _ = commands.launch(cmd, stdin=subprocess.DEVNULL, group=group)
    out, _ = popen.communicate(timeout=30)
    assert recorder.path.read_text() == "0 0"
    assert out.decode().split() == [str(NOBODY), str(NOBODY), "NoNewPrivs:", str(int(no_new_privs))]


@pytest.mark.parametrize(
    "user",
    [
        "nobody",
        {"gid": 1},
        {"uid": -1, "gid": 1},
        {"uid": 1, "gid": 1 << 32},
        {"uid": 1, "gid": 1, "name": "a:b"},
        {"uid": 1, "gid": 1, "no_new_privs": "yes"},
    ],
)
async def test_bad_user_field_is_invalid_request(client: AgentClient, user: object) -> None:
    with pytest.raises(errors.InvalidRequest):
        await client.request(protocol.Op.EXEC, argv=["true"], user=user)


def test_group_file_is_read_again_only_when_it_changes(tmp_path: Path) -> None:
    group = tmp_path / "group"
    group.write_text("user:x:1000:\nsudo:x:27:user,other\nbad line\ndocker:x:999: other , user\n")
    groups = runas.GroupFile(str(group))
    assert groups.of("user", 1000) == (1000, 27, 999)
    assert groups.of("other", 50) == (50, 27, 999)
    assert groups.of("nobody", 65534) == (65534,)
    group.write_text("audio:x:29:user\n")
    os.utime(group, ns=(1, 1))  # a change the (ino, mtime, size) key sees
    assert groups.of("user", 1000) == (1000, 29)
    group.unlink()
    assert groups.of("user", 1000) == (1000,)


def test_spec_for_an_agent_that_cannot_switch() -> None:
    """Without the feature the user becomes a setpriv prefix (or the spec's own
    fallback), and the spec no longer carries `user` (an old agent ignores it)."""
    spec = SpawnSpec(["bash", "-l", "-c", "id"], user=RunAs(1000, 1000, "user"))
    assert spec.for_agent(True) is spec
    wrapped = spec.for_agent(False)
    assert wrapped.user is None
    assert list(wrapped.cmd) == [
        "setpriv", "--reuid=1000", "--regid=1000", "--init-groups", "--",
        "bash", "-l", "-c", "id",
    ]  # fmt: skip
    shell = ExecSpec("id", user=RunAs(5, 6, no_new_privs=True)).for_agent(False)
    assert list(shell.cmd) == [
        "setpriv", "--reuid=5", "--regid=6", "--clear-groups", "--no-new-privs", "--",
        "/bin/sh", "-c", "id",
    ]  # fmt: skip
    own = ExecSpec(["id"], user=RunAs(5, 6, fallback=("run-as", "5"))).for_agent(False)
    assert list(own.cmd) == ["run-as", "5", "id"]
    assert ExecSpec(["id"]).for_agent(False).cmd == ("id",)


class FakeOldAgent:
    """An agent of an image built before the feature: its hello lists none, it ignores
    `user`, and it records every request it gets."""

    def __init__(self, sock: socket.socket, features: list[str] | None) -> None:
        self._sock = sock
        self._features = features
        self.requests: list[dict[str, Any]] = []

    async def serve(self) -> None:
        reader, writer = await asyncio.open_connection(sock=self._sock)
        decoder = protocol.FrameDecoder()
        while data := await reader.read(65536):
            for frame in decoder.feed(data):
                if frame.kind is not protocol.Kind.REQUEST:
                    continue
                req = frame.json()
                self.requests.append(req)
                answer: dict[str, Any] = {"ok": True, "pid": 7, "exit_code": 0}
                if req["op"] == protocol.Op.HELLO:
                    answer = {"ok": True, "protocol": protocol.PROTOCOL_VERSION}
                    answer |= {"agent_version": "0.0.9", "boot_time": 1.0, "kernel": "k"}
                    if self._features is not None:
                        answer["features"] = self._features
                writer.write(protocol.encode_json(protocol.Kind.RESPONSE, frame.rid, answer))
                await writer.drain()
        writer.close()


async def _spawn_through(features: list[str] | None) -> dict[str, Any]:
    """The spawn request a client sends after a hello with `features` (None: no field)."""
    ours, theirs = socket.socketpair()
    fake = FakeOldAgent(theirs, features)
    serving = asyncio.create_task(fake.serve())
    try:
        async with AgentClient(*await asyncio.open_connection(sock=ours)) as client:
            await client.handshake(timeout_s=5)
            spec = SpawnSpec(["bash", "-l", "-c", "id"], user=RunAs(1000, 1000, "user"))
            assert await client.spawn(spec) == 7
    finally:
        await asyncio.wait_for(serving, 5)
    return fake.requests[-1]


async def test_old_agent_gets_the_setpriv_wrapper() -> None:
    """An agent that does not list `user` never sees the field: the command is wrapped."""
    for features in (None, [], ["something-else"]):
        sent = await _spawn_through(features)
        assert sent["op"] == "spawn" and sent["user"] is None
        assert sent["argv"][:5] == [
            "setpriv", "--reuid=1000", "--regid=1000", "--init-groups", "--",
        ]  # fmt: skip
        assert sent["argv"][5:] == ["bash", "-l", "-c", "id"]


async def test_new_agent_gets_the_user_field() -> None:
    sent = await _spawn_through([protocol.FEATURE_USER])
    assert sent["argv"] == ["bash", "-l", "-c", "id"]
    assert sent["user"] == {"uid": 1000, "gid": 1000, "name": "user", "no_new_privs": False}


@as_root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux's setpriv")
async def test_client_without_a_hello_wraps(agent: RunningAgent) -> None:
    """A client that has not (yet) seen a hello assumes an agent that cannot switch: the
    real agent then runs the setpriv wrapper (util-linux on the host), to the same user."""
    async with await agent.connect() as fresh:
        assert not fresh.switches_user
        result = await fresh.exec(ExecSpec(["id", "-u"], user=RunAs(NOBODY, NOBODY)))
        assert (result.exit_code, result.stdout.strip()) == (0, str(NOBODY).encode())


async def test_warm_run_refuses_a_user(client: AgentClient) -> None:
    from emberbox.agent_client.client import WarmProgram

    with pytest.raises(errors.InvalidRequest):
        await client.run(
            ExecSpec(["true"], user=RunAs(1, 1)), warm=WarmProgram("python3", "x.py", [])
        )


def _thread_statuses(pid: int) -> dict[str, str]:
    """/proc/PID/task/*/status of every thread of `pid`, by thread id."""
    tasks = Path(f"/proc/{pid}/task")
    return {task.name: (task / "status").read_text() for task in tasks.iterdir()}


def _ids(status: str, field: str) -> list[str]:
    return next(line.split()[1:] for line in status.splitlines() if line.startswith(field + ":"))


@as_root
async def test_vforked_command_ends_with_the_users_ids_and_no_capability(
    client: AgentClient,
) -> None:
    """A command started by the calling thread as the user (runas.as_user): real,
    effective, saved and filesystem ids all the user's, no capability left, as after
    Popen's own setreuid; and the agent's every thread is root again afterwards."""
    agent_pid = int((await client.exec(ExecSpec("echo $PPID"))).stdout)
    spec = ExecSpec(["cat", "/proc/self/status"], user=RunAs(NOBODY, 4242))
    result = await client.exec(spec)
    assert result.exit_code == 0, result.stderr
    status = result.stdout.decode()
    assert _ids(status, "Uid") == [str(NOBODY)] * 4
    assert _ids(status, "Gid") == ["4242"] * 4
    assert _ids(status, "Groups") == ["4242"]
    for field in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert int(_ids(status, field)[0], 16) == 0, field
    for task, text in _thread_statuses(agent_pid).items():
        assert _ids(text, "Uid") == ["0"] * 4 and _ids(text, "Gid") == ["0"] * 4, task


@as_root
async def test_a_cwd_the_user_cannot_enter_is_a_bad_request(
    client: AgentClient, files: Path
) -> None:
    """The vforked child changes directory as the user (as E2B's envd does): a cwd only
    root may enter is refused with its reason, and root still runs there."""
    private = files / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(errors.InvalidRequest, match="Permission denied for uid 65534"):
        await client.exec(ExecSpec(["true"], cwd=str(private), user=RunAs(NOBODY, NOBODY)))
    assert (await client.exec(ExecSpec(["true"], cwd=str(private)))).exit_code == 0
    who = await client.exec(ExecSpec(["id", "-u"], user=RunAs(NOBODY, NOBODY)))
    assert who.stdout.split() == [str(NOBODY).encode()]
