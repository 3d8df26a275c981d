"""Dockerfile builds in real builder microVMs: a full build (apt, pip, COPY, ENV,
WORKDIR, USER) that a sandbox of the image sees, the layer cache (a rebuild boots
nothing; an edited last line re-runs only that step), and bad input refused with
nothing registered and nothing left running.

The module has its own cache dir (layer cache, registered images) holding a hard-linked
copy of the ``default`` image, so every run builds cold; one full build is shared by
the tests that look at it (apt and pip under TCG are slow).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

from emberbox import errors
from emberbox.agent_client.spec import ExecSpec
from emberbox.config import Settings
from emberbox.images.registry import ImageInfo, ImageRegistry
from emberbox.models.images import BuildEvent
from emberbox.net.addresses import namespace_name
from emberbox.service.images.build import BuildDeps, BuildRequest, build_image
from emberbox.service.vm.machine import SandboxVM
from emberbox.vmm.base import VM, Driver, SnapshotFiles, VMConfig
from emberbox.vmm.select import choose_driver
from tests.support.paths import qemu_pids_under, short_tmp_dir

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]

NETWORK_CIDR = "10.219.0.0/16"  # this module's builders
# The host's extra CAs (a TLS-intercepting egress proxy) go in first, as a company's would:
# pip checks certificates against the system store.
DOCKERFILE = """\
# syntax=docker/dockerfile:1
FROM default
ARG PKG=jq
RUN apt-get update -qq && \\
    apt-get install -y -qq --no-install-recommends $PKG python3-pip >/dev/null && \\
    rm -rf /var/lib/apt/lists/*
COPY ca/ /usr/local/share/ca-certificates/
RUN update-ca-certificates >/dev/null && \\
    pip install -q --no-cache-dir --break-system-packages six==1.16.0
RUN mkdir -p /opt/app && chown user:user /opt/app
COPY --chown=user:user hello.txt notes/ /opt/app/
ENV GREETING="hello from env"
WORKDIR /opt/app
USER user
RUN echo "$GREETING|$(pwd)|$(id -u)" > probe.txt
"""
EDITED = DOCKERFILE.replace('echo "$GREETING', 'echo "edited $GREETING')


class CountingDriver:
    """The real driver, counting the VMs it starts (a cached build starts none)."""

    def __init__(self, inner: Driver) -> None:
        self.inner = inner
        self.name = inner.name
        self.starts = 0

    def version(self) -> str:
        return self.inner.version()

    def snapshot_key(self) -> str:
        return self.inner.snapshot_key()

    async def start(self, config: VMConfig) -> VM:
        self.starts += 1
        return await self.inner.start(config)

    async def restore(
        self, config: VMConfig, snapshot: SnapshotFiles, *, adopt_disk: bool = False
    ) -> VM:
        return await self.inner.restore(config, snapshot, adopt_disk=adopt_disk)

    async def attach(self, config: VMConfig, pid: int) -> VM:
        return await self.inner.attach(config, pid)


@dataclass
class Env:
    root: Path
    settings: Settings
    driver: CountingDriver
    deps: BuildDeps
    context: Path
    events: list[BuildEvent] = field(default_factory=list)

    async def build(self, name: str, text: str, **kwargs: Any) -> ImageInfo:
        self.events.clear()
        request = BuildRequest(name, None, text, kwargs.pop("context", self.context), **kwargs)
        return await build_image(self.deps, request, self.events.append)

    def steps(self) -> dict[int, str]:
        """The last state of each step in the last build."""
        return {e.step: str(e.state) for e in self.events if e.kind == "step" and e.step}

    def leftovers(self) -> list[str]:
        """Anything of a builder still there: QEMU, work dirs, scratch, namespaces."""
        found = [f"qemu {pid}" for pid in qemu_pids_under(self.root)]
        for directory in (self.settings.vms_dir, self.settings.build_cache_dir / "work"):
            if directory.is_dir():
                found += [str(p) for p in directory.iterdir()]
        netns = Path("/run/netns")
        if netns.is_dir():
            prefix = namespace_name("build-")
            found += [p.name for p in netns.iterdir() if p.name.startswith(prefix)]
        partial = self.settings.build_cache_dir / "layers"
        if partial.is_dir():
            found += [str(p) for p in partial.iterdir() if p.name.startswith(".")]
        return found


def _tar(members: dict[str, bytes | tuple[str, str]]) -> bytes:
    """A tar of files (bytes) and links (("sym" | "hard", target))."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, value in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(value, tuple):
                info.type = tarfile.SYMTYPE if value[0] == "sym" else tarfile.LNKTYPE
                info.linkname = value[1]
                tar.addfile(info)
            else:
                info.size = len(value)
                tar.addfile(info, io.BytesIO(value))
    return buffer.getvalue()


def context_members() -> dict[str, bytes | tuple[str, str]]:
    members: dict[str, bytes | tuple[str, str]] = {
        "hello.txt": b"hello from the context\n",
        "notes/a.txt": b"note a\n",
        "secret.key": b"never copied\n",
        ".dockerignore": b"*.key\n",
        "ca/README": b"extra CA certificates (*.crt) of this host\n",
    }
    host_cas = Path("/usr/local/share/ca-certificates")
    for cert in sorted(host_cas.glob("*.crt")) if host_cas.is_dir() else []:
        members[f"ca/{cert.name}"] = cert.read_bytes()
    return members


@pytest.fixture(scope="module")
def env(default_image: ImageInfo) -> Iterator[Env]:
    root = short_tmp_dir("eb-build-")
    try:
        blobs = root / "cache" / "images" / "blobs"
        blobs.mkdir(parents=True)
        copy = blobs / default_image.directory.name
        subprocess.run(["cp", "-al", str(default_image.directory), str(copy)], check=True)
        os.symlink(f"blobs/{copy.name}", root / "cache" / "images" / "default")
        settings = Settings(
            data_dir=root / "data",
            cache_dir=root / "cache",
            EMBERBOX_IMAGES_DIR=root / "cache" / "images",
            network_cidr=NETWORK_CIDR,
            build_disk_mib=3072,
            pool_size=0,
        )
        settings.vms_dir.mkdir(parents=True)
        base = ImageRegistry(settings).get("default")
        driver = CountingDriver(choose_driver(settings, base.files).driver)
        context = root / "context.tar"
        context.write_bytes(_tar(context_members()))
        yield Env(root, settings, driver, BuildDeps(settings, driver=driver), context)
    finally:
        for pid in qemu_pids_under(root):
            subprocess.run(["kill", "-9", str(pid)], check=False)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
async def built(env: Env) -> ImageInfo:
    """The full build, once for the module."""
    try:
        info = await env.build("app", DOCKERFILE)
    except errors.ImageBuildError as exc:
        pytest.fail(f"{exc.message}\n--- log tail ---\n{exc.details.get('log')}")
    assert env.leftovers() == []
    return info


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


async def sh(vm: SandboxVM, cmd: str, **kwargs: Any) -> str:
    result = await vm.agent.exec(ExecSpec(cmd, timeout_s=60, **kwargs))
    assert result.exit_code == 0, (cmd, result.stdout, result.stderr)
    return result.stdout.decode()


@pytest.mark.anyio
async def test_a_sandbox_of_the_built_image_sees_every_step(env: Env, built: ImageInfo) -> None:
    """The package, the pip module, the copied files (owned by user, .dockerignore
    honoured) and the RUN that ran with the ENV, WORKDIR and USER are in the image;
    its config records them for its sandboxes."""
    config = built.config
    assert config.env["GREETING"] == "hello from env"
    assert (config.workdir, config.user) == ("/opt/app", "user")
    assert built.manifest["created_by"] == "dockerfile" and built.base == "default"
    assert len(built.layers) == 6  # 4 RUN + 2 COPY
    vm = await SandboxVM.start(env.settings, image="app", memory_mib=512)
    try:
        assert (await sh(vm, "jq -n '1+1'")).strip() == "2"
        assert (await sh(vm, "python3 -c 'import six; print(six.__version__)'")).strip() == "1.16.0"
        assert await sh(vm, "cat /opt/app/hello.txt") == "hello from the context\n"
        assert await sh(vm, "cat /opt/app/a.txt") == "note a\n"
        assert (await sh(vm, "stat -c %U /opt/app/hello.txt")).strip() == "user"
        assert (await sh(vm, "ls /opt/app")).split() == ["a.txt", "hello.txt", "probe.txt"]
        uid = (await sh(vm, "id -u user")).strip()
        probe = (await sh(vm, "cat /opt/app/probe.txt")).strip()
        assert probe == f"hello from env|/opt/app|{uid}"
        assert uid != "0"
        as_image = await sh(
            vm, 'echo "$GREETING|$(pwd)|$(id -u)"', env=config.env, cwd=config.workdir
        )
        assert as_image.strip() == "hello from env|/opt/app|0"  # root: the agent's default
    finally:
        await vm.kill()


@pytest.mark.anyio
async def test_the_same_build_again_is_a_cache_hit_that_boots_nothing(
    env: Env, built: ImageInfo
) -> None:
    """Every step cached, no VM started, the same image content."""
    starts = env.driver.starts
    again = await env.build("app", DOCKERFILE)
    assert env.driver.starts == starts
    assert set(env.steps().values()) == {"cached"}
    assert again.manifest["build_key"] == built.manifest["build_key"]
    assert env.leftovers() == []


@pytest.mark.anyio
async def test_editing_the_last_line_reruns_only_that_step(env: Env, built: ImageInfo) -> None:
    """One builder VM, only the last RUN runs; the earlier layers are reused."""
    starts = env.driver.starts
    info = await env.build("app-edited", EDITED)
    steps = env.steps()
    last = max(steps)
    assert steps[last] == "done"
    assert {state for index, state in steps.items() if index != last} == {"cached"}
    assert env.driver.starts == starts + 1
    assert [layer["digest"] for layer in info.layers[:-1]] == [
        layer["digest"] for layer in built.layers[:-1]
    ]
    assert info.layers[-1]["digest"] != built.layers[-1]["digest"]
    assert env.leftovers() == []


@pytest.mark.anyio
async def test_concurrent_builds_of_one_dockerfile_do_the_work_once(env: Env) -> None:
    """Two builds at once: one builder VM; the second finds every step cached."""
    text = "FROM default\nRUN echo concurrent > /made\n"
    starts = env.driver.starts
    states: list[list[str]] = [[], []]

    async def build(index: int) -> ImageInfo:
        def sink(event: BuildEvent) -> None:
            if event.kind == "step" and event.state != "running":
                states[index].append(str(event.state))

        request = BuildRequest(f"twin{index}", None, text)
        return await build_image(env.deps, request, sink)

    results: list[ImageInfo] = []

    async def run(index: int) -> None:
        results.append(await build(index))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, 0)
        tg.start_soon(run, 1)
    assert env.driver.starts == starts + 1
    assert sorted(states) == [["cached"], ["done"]]
    assert results[0].manifest["build_key"] == results[1].manifest["build_key"]
    assert env.leftovers() == []


@pytest.mark.anyio
async def test_copying_the_whole_context_leaves_out_what_dockerignore_lists(env: Env) -> None:
    """`COPY . /dst/` of a context whose .dockerignore names a file and a pattern: the
    image's /dst (listed by the next step, in the builder, on the image's disk) has
    every other file and none of the ignored ones."""
    context = env.root / "ignore.tar"
    ignore = b"# not these\ndrop.txt\nsub/*.log\n"
    context.write_bytes(
        _tar(
            {
                ".dockerignore": ignore,
                "keep.txt": b"kept\n",
                "drop.txt": b"dropped\n",
                "sub/also.txt": b"also kept\n",
                "sub/noise.log": b"dropped too\n",
            }
        )
    )
    text = "FROM default\nCOPY . /dst/\nRUN cd /dst && find . -type f | sort && cat keep.txt\n"
    info = await env.build("ignored", text, context=context)
    assert env.steps() == {1: "done", 2: "done"}
    output = "".join(str(e.log) for e in env.events if e.kind == "log")
    assert output.splitlines() == ["./.dockerignore", "./keep.txt", "./sub/also.txt", "kept"]
    assert [layer["step"] for layer in info.layers] == ["COPY . /dst/", text.splitlines()[2]]
    assert env.leftovers() == []


def _refused(env: Env, name: str) -> None:
    assert name not in ImageRegistry(env.settings).names()
    assert env.leftovers() == []


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("text", "members", "message"),
    [
        ("FROM default\nRUN true\nVOLUME /data\n", None, "line 3: VOLUME is not supported"),
        ("FROM default\nCOPY ../outside /x\n", None, "outside the build context"),
        ("FROM default\nCOPY missing.txt /x\n", None, "not in the build context"),
        ("FROM default\nCOPY . /x/\n", {"/etc/passwd": b"x"}, "absolute path"),
        ("FROM default\nCOPY . /x/\n", {"evil": ("sym", "../../etc")}, "points outside"),
        ("FROM default\nCOPY . /x/\n", {"evil": ("sym", "/etc/shadow")}, "points outside"),
        ("FROM default\nCOPY . /x/\n", {"h": ("hard", "/etc/passwd")}, "absolute path"),
        ("FROM nosuchimage\nRUN true\n", None, "unknown image"),
    ],
)
async def test_bad_input_is_refused_before_anything_boots(
    env: Env, text: str, members: dict[str, Any] | None, message: str
) -> None:
    """A clear InvalidRequest naming the problem; no VM, nothing registered."""
    context = env.context
    if members is not None:
        context = env.root / "bad.tar"
        context.write_bytes(_tar(members))
    starts = env.driver.starts
    with pytest.raises(errors.InvalidRequest) as caught:
        await env.build("bad", text, context=context)
    assert message in caught.value.message
    assert env.driver.starts == starts
    assert env.events[-1].kind == "error" and message in str(env.events[-1].message)
    _refused(env, "bad")


@pytest.mark.anyio
async def test_a_disk_beyond_the_image_size_limit_fails_the_step(env: Env) -> None:
    """`RUN fallocate -l 10G` on the 3 GiB builder disk: the step's exit code and log
    tail, the size limit named, nothing registered or left running."""
    with pytest.raises(errors.ImageBuildError) as caught:
        await env.build("huge", "FROM default\nRUN fallocate -l 10G /big\n")
    exc = caught.value
    assert exc.details["exit_code"] != 0 and exc.details["step"] == 1
    assert "No space left on device" in exc.details["log"]
    assert "EMBERBOX_BUILD_DISK_MIB" in exc.message
    error = env.events[-1]
    assert error.kind == "error" and error.exit_code == exc.details["exit_code"]
    assert env.steps()[1] == "running"
    _refused(env, "huge")


@pytest.mark.anyio
async def test_a_step_that_never_ends_hits_the_step_timeout(env: Env) -> None:
    """`RUN sleep 1000` under a 5 s step timeout: a clear timeout error, nothing left."""
    settings = env.settings.model_copy(update={"build_step_timeout_s": 5.0})
    deps = BuildDeps(settings, driver=env.driver)
    events: list[BuildEvent] = []
    request = BuildRequest("sleepy", None, "FROM default\nRUN echo started; sleep 1000\n")
    with pytest.raises(errors.ImageBuildError) as caught:
        await build_image(deps, request, events.append)
    assert "timed out after 5 s" in caught.value.message
    assert caught.value.details["log"] == "started\n"
    assert events[-1].kind == "error"
    _refused(env, "sleepy")


@pytest.mark.anyio
async def test_a_cancelled_build_leaves_nothing(env: Env) -> None:
    """Cancelled while a RUN runs: the builder VM, its network and the scratch dir go."""
    started = anyio.Event()

    def sink(event: BuildEvent) -> None:
        if event.kind == "log":
            started.set()

    request = BuildRequest("cancelled", None, "FROM default\nRUN echo started; sleep 1000\n")
    with anyio.fail_after(300):
        async with anyio.create_task_group() as tg:
            tg.start_soon(build_image, env.deps, request, sink)
            await started.wait()
            assert env.leftovers() != []  # the builder is there while it runs
            tg.cancel_scope.cancel()
    _refused(env, "cancelled")
