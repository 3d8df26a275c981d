"""The build engine's pure parts: step keys, the layer cache on disk, per-key locks, the
overlay flattening command, the user prefix of a RUN, and the image config a step makes."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from emberbox.config import Settings
from emberbox.errors import ImageNotFound, InvalidRequest
from emberbox.images.dockerfile import ConfigStep, plan
from emberbox.images.registry import ImageConfig
from emberbox.models.images import BuildEvent
from emberbox.service.images.build import (
    DEFAULT_PATH,
    BuildDeps,
    BuildRequest,
    apply_config,
    base_variables,
    build_image,
    command_of,
)
from emberbox.service.images.builder import user_argv
from emberbox.service.images.cache import KeyLocks, LayerCache, step_key
from emberbox.service.images.layers import convert_argv


def test_step_keys_chain_parent_step_and_content() -> None:
    """Any of the three changes the key; the same inputs give the same key."""
    key = step_key("p", ["RUN", "x"], "c")
    assert key == step_key("p", ["RUN", "x"], "c")
    assert (
        len(
            {
                key,
                step_key("q", ["RUN", "x"], "c"),
                step_key("p", ["RUN", "y"], "c"),
                step_key("p", ["RUN", "x"], "d"),
                step_key("p", ["RUN", "x"]),
            }
        )
        == 5
    )


def test_keys_of_a_plan_change_with_a_build_arg_a_run_uses() -> None:
    """ARG V; RUN echo $V: another --build-arg is another key for the RUN."""
    text = "FROM d\nARG V=1\nRUN echo $V\n"
    one, two = plan(text, {"V": "1"}).steps[-1], plan(text, {"V": "2"}).steps[-1]
    assert step_key("p", one.key()) != step_key("p", two.key())


def test_layer_cache_publish_is_whole_and_first_writer_wins(tmp_path: Path) -> None:
    """An entry appears whole; a second publish of the same key keeps the first."""
    cache = LayerCache(Settings(cache_dir=tmp_path))
    assert cache.layer("k") is None
    first = tmp_path / "first.ext4"
    first.write_bytes(b"one")
    found = cache.publish("k", first, {"size": 3})
    assert found.read_bytes() == b"one" and cache.meta("k") == {"size": 3}
    second = tmp_path / "second.ext4"
    second.write_bytes(b"two")
    assert cache.publish("k", second, {"size": 3}).read_bytes() == b"one"
    assert not second.exists()
    assert [p.name for p in cache.layers.iterdir()] == ["k"]  # no staging dir left


@pytest.mark.anyio
async def test_key_locks_serialise_one_key_and_forget_it() -> None:
    """Two holders of one key run one after the other; other keys do not wait."""
    locks = KeyLocks()
    order: list[str] = []

    async def hold(key: str, name: str) -> None:
        async with locks.hold(key):
            order.append(f"{name}+")
            await asyncio.sleep(0.01)
            order.append(f"{name}-")

    await asyncio.gather(hold("a", "1"), hold("a", "2"))
    assert order in (["1+", "1-", "2+", "2-"], ["2+", "2-", "1+", "1-"])
    order.clear()
    await asyncio.gather(hold("a", "1"), hold("b", "2"))
    assert order[:2] == ["1+", "2+"]
    assert locks._locks == {}


def test_convert_names_the_backing_explicitly() -> None:
    """The overlay's header is never trusted for its backing; commas are escaped."""
    argv = convert_argv("qemu-img", Path("/c/o,v.qcow2"), Path("/c/base.ext4"), Path("/c/out"))
    assert argv[:4] == ["qemu-img", "convert", "-U", "--image-opts"]
    assert "file.filename=/c/o,,v.qcow2" in argv[4]
    assert "backing.driver=raw" in argv[4] and "backing.file.filename=/c/base.ext4" in argv[4]
    assert argv[5:] == ["-O", "raw", "/c/out"]


@pytest.mark.parametrize(
    ("user", "prefix"),
    [
        ("", []),
        ("root", []),
        ("0:0", []),
        ("user", ["runuser", "-u", "user", "--"]),
        ("user:staff", ["runuser", "-u", "user", "-g", "staff", "--"]),
        ("1000", ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups"]),
        ("1000:50", ["setpriv", "--reuid=1000", "--regid=50", "--clear-groups"]),
    ],
)
def test_user_prefix(user: str, prefix: list[str]) -> None:
    """USER becomes runuser (a name) or setpriv (numbers); root runs as is."""
    assert user_argv(user) == prefix


def test_config_steps_build_the_image_config() -> None:
    """ENV and LABEL merge, WORKDIR/USER replace."""
    config = ImageConfig(env={"A": "base", "B": "b"}, labels={"x": "1"})
    steps = plan("FROM d\nENV A=1\nLABEL y=2\nWORKDIR /w\nUSER user\n").steps
    for step in steps:
        assert isinstance(step, ConfigStep)
        config = apply_config(config, step)
    assert config.env == {"A": "1", "B": "b"}
    assert config.labels == {"x": "1", "y": "2"}
    assert (config.workdir, config.user) == ("/w", "user")


def test_env_expands_the_base_images_variables() -> None:
    """``ENV PATH=/opt/bin:$PATH`` keeps the base's PATH (the agent's when the image
    sets none, the image's own otherwise), and a relative WORKDIR starts at the base's."""
    text = "FROM d\nENV PATH=/opt/bin:$PATH HOME2=$HOME\nWORKDIR app\n"
    ours = plan(text, base_env=base_variables(ImageConfig()), base_workdir="")
    env_step, workdir_step = ours.steps
    assert isinstance(env_step, ConfigStep) and isinstance(workdir_step, ConfigStep)
    assert dict(env_step.env) == {"PATH": f"/opt/bin:{DEFAULT_PATH}", "HOME2": ""}
    assert workdir_step.workdir == "/app"
    foreign = ImageConfig(env={"PATH": "/bin", "HOME": "/home/x"}, workdir="/srv")
    theirs = plan(text, base_env=base_variables(foreign), base_workdir=foreign.workdir)
    env_step, workdir_step = theirs.steps
    assert isinstance(env_step, ConfigStep) and isinstance(workdir_step, ConfigStep)
    assert dict(env_step.env) == {"PATH": "/opt/bin:/bin", "HOME2": "/home/x"}
    assert workdir_step.workdir == "/srv/app"


def test_default_path_is_the_agents() -> None:
    from emberbox.guest.commands import DEFAULT_ENV

    assert DEFAULT_ENV["PATH"] == DEFAULT_PATH


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ("", ["base"]),
        ('CMD ["app"]', ["app"]),
        ('ENTRYPOINT ["tini"]\nCMD ["app"]', ["tini", "app"]),
        ('CMD ["app"]\nENTRYPOINT ["tini"]', ["tini"]),
        ("CMD echo hi", ["/bin/sh", "-c", "echo hi"]),
    ],
)
def test_entrypoint_and_cmd_join_as_in_docker(lines: str, expected: list[str]) -> None:
    """ENTRYPOINT + CMD; an ENTRYPOINT resets an earlier CMD; the base's otherwise."""
    steps = plan(f"FROM d\n{lines}\n").steps
    assert command_of(["base"], steps) == expected


def test_prune_removes_least_recently_used_layers_but_not_kept_ones(tmp_path: Path) -> None:
    """Over the cap, the oldest-used entries go first; a kept key and a just-used one stay."""
    cache = LayerCache(Settings(cache_dir=tmp_path))
    for index, key in enumerate(["old", "mid", "new"]):
        disk = tmp_path / f"{key}.ext4"
        disk.write_bytes(b"x" * 8192)
        cache.publish(key, disk, {})
        os.utime(cache.layers / key / "meta.json", (1000 + index, 1000 + index))
    assert cache.layer("old") is not None  # used now: the most recent
    removed = cache.prune(max_bytes=2 * 8192 + 2 * 4096, keep={"mid"})
    assert removed == ["new"]
    assert cache.layer("old") is not None and cache.layer("mid") is not None
    assert cache.prune(max_bytes=0, keep={"mid"}) == ["old"]
    assert cache.prune(max_bytes=1 << 30) == []


@pytest.mark.anyio
@pytest.mark.parametrize(
    "ref", ["oci:/srv/layout:1", "oci-archive:/etc/x.tar", "docker-archive:/x"]
)
async def test_a_tenants_build_may_not_import_the_servers_files(tmp_path: Path, ref: str) -> None:
    """FROM oci:/path (a server file) is the operator's to import, never a tenant's;
    refused before anything is read or booted, with an error event."""
    events: list[BuildEvent] = []
    deps = BuildDeps(Settings(cache_dir=tmp_path, data_dir=tmp_path / "data"))
    request = BuildRequest("app", "tenant-1", f"FROM {ref}\nRUN true\n")
    with pytest.raises(InvalidRequest, match="not the server's files"):
        await build_image(deps, request, events.append)
    assert [e.kind for e in events] == ["error"]


@pytest.mark.anyio
async def test_an_unknown_plain_base_is_an_unknown_image(tmp_path: Path) -> None:
    """FROM nosuch (no registry syntax): ImageNotFound, no import tried."""
    deps = BuildDeps(Settings(cache_dir=tmp_path, data_dir=tmp_path / "data"))
    with pytest.raises(ImageNotFound):
        await build_image(deps, BuildRequest("app", None, "FROM nosuch\n"), lambda _e: None)
