"""An image's defaults (its :class:`~emberbox.images.registry.ImageConfig`: ENV, WORKDIR,
USER) applied to every command of a sandbox of that image, under the request's own.

The order, weakest first: the image's env (and ``HOME``/``USER``/``LOGNAME`` of its
user), the sandbox's env (its create request), the command's env. ``cwd``: the command's,
else the image's WORKDIR, else the agent's default. ``USER``: the guest agent runs as
root, so a command of an image with a user gets that user's uid, gid and groups as its
spec's ``user`` (``RunAs``), which the agent takes itself between fork and exec — as for
the E2B front; agents of images built before that get a wrapper instead (``setpriv``,
util-linux; in a foreign userland, our runtime's python). A command that already has a
``user``, or starts with ``setpriv``, chose its own user and is left alone. User names
are resolved once per image build from the image's own ``/etc/passwd`` and
``/etc/group``, read on the host with ``debugfs`` (no VM, no mount).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import anyio.to_thread

from emberbox import errors
from emberbox.agent_client.spec import CommandSpec, RunAs
from emberbox.config import Settings
from emberbox.images import foreign
from emberbox.images.registry import ImageConfig, ImageRegistry

log = logging.getLogger(__name__)

S = TypeVar("S", bound=CommandSpec)
SETPRIV = "setpriv"
DEBUGFS_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class RunDefaults:
    """What an image adds to its sandboxes' commands."""

    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    user: RunAs | None = None  # the image's user, if not root

    def apply(self, spec: S, sandbox_env: dict[str, str]) -> S:
        env = {**self.env, **sandbox_env, **spec.env}
        user = spec.user
        if user is None and not _chose_user(spec.cmd):
            user = self.user
        return dataclasses.replace(spec, env=env, cwd=spec.cwd or self.cwd, user=user)


NONE = RunDefaults()


def _chose_user(cmd: Sequence[str] | str) -> bool:
    return not isinstance(cmd, str) and bool(cmd) and os.path.basename(cmd[0]) == SETPRIV


@dataclass(frozen=True)
class Account:
    uid: int
    gid: int
    name: str | None  # None: a numeric user the image's passwd does not list
    home: str


def parse_passwd(text: str) -> list[tuple[str, int, int, str]]:
    """(name, uid, gid, home) of each well-formed passwd line."""
    rows = []
    for line in text.splitlines():
        parts = line.split(":")
        if len(parts) >= 6 and parts[2].isdigit() and parts[3].isdigit():
            rows.append((parts[0], int(parts[2]), int(parts[3]), parts[5]))
    return rows


def parse_group(text: str) -> dict[str, int]:
    groups = {}
    for line in text.splitlines():
        parts = line.split(":")
        if len(parts) >= 3 and parts[2].isdigit():
            groups[parts[0]] = int(parts[2])
    return groups


def resolve_user(spec: str, passwd: str, group: str) -> Account:
    """Docker's ``USER`` (``name``, ``uid``, ``name:group``, ``uid:gid``) as an account of
    the image; InvalidRequest for a name the image does not have."""
    user, _, grp = spec.partition(":")
    users = parse_passwd(passwd)
    found = next((u for u in users if u[0] == user), None)
    if found is None and user.isdigit():
        found = next((u for u in users if u[1] == int(user)), None)
        if found is None:
            uid = int(user)
            account = Account(uid, uid, None, "/")
            return _with_group(account, grp, group)
    if found is None:
        raise errors.InvalidRequest(f"the image's USER {user!r} is not in its /etc/passwd")
    return _with_group(Account(found[1], found[2], found[0], found[3] or "/"), grp, group)


def _with_group(account: Account, grp: str, group: str) -> Account:
    if not grp:
        return account
    if grp.isdigit():
        return dataclasses.replace(account, gid=int(grp))
    gid = parse_group(group).get(grp)
    if gid is None:
        raise errors.InvalidRequest(f"the image's USER group {grp!r} is not in its /etc/group")
    return dataclasses.replace(account, gid=gid)


def defaults_of(config: ImageConfig, rootfs: Path) -> RunDefaults:
    """The run defaults of an image (reads its passwd only when it has a USER)."""
    env = dict(config.env)
    user = None
    if config.user and config.user not in ("root", "0", "0:0"):
        account = resolve_user(
            config.user,
            read_image_file(rootfs, "/etc/passwd"),
            read_image_file(rootfs, "/etc/group"),
        )
        if account.uid != 0:
            fallback = None  # setpriv (RunAs.prefix), for agents that cannot switch
            if config.userland == "foreign":  # no setpriv there: the agent's runtime does it
                fallback = tuple(foreign.run_as_argv(account.uid, account.gid, account.name))
            user = RunAs(account.uid, account.gid, account.name, fallback=fallback)
        login = {"HOME": account.home}
        if account.name:
            login |= {"USER": account.name, "LOGNAME": account.name}
        env = {**login, **env}
    return RunDefaults(env=env, cwd=config.workdir or None, user=user)


def read_image_file(rootfs: Path, path: str) -> str:
    """A small file of an ext4 image, read with debugfs ("" when it has none)."""
    try:
        done = subprocess.run(
            ["debugfs", "-R", f"cat {path}", str(rootfs)],
            capture_output=True,
            timeout=DEBUGFS_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise errors.HostError(f"cannot read {path} of the image: {exc}") from exc
    return done.stdout.decode(errors="replace") if done.returncode == 0 else ""


class ImageDefaults:
    """Run defaults per image ref, cached per image build (the ref's blob)."""

    def __init__(self, settings: Settings) -> None:
        self._registry = ImageRegistry(settings)
        self._cache: dict[str, tuple[Path, RunDefaults]] = {}
        self._lock = threading.Lock()

    def _blob(self, ref: str) -> Path | None:
        try:
            return (self._registry.root / ref).resolve()
        except (OSError, RuntimeError):
            return None

    def cached(self, ref: str) -> RunDefaults | None:
        """The defaults if known for the ref's current build (no file reads but a
        readlink); None when they must be loaded."""
        hit = self._cache.get(ref)
        if hit is not None and hit[0] == self._blob(ref):
            return hit[1]
        return None

    def load(self, ref: str) -> RunDefaults:
        """Blocking: read the manifest (and passwd) of the ref's current build."""
        try:
            info = self._registry.get(ref)
        except errors.ImageNotFound:  # deleted since: the sandbox runs on, without defaults
            blob = self._blob(ref)
            if blob is not None:
                with self._lock:
                    self._cache[ref] = (blob, NONE)
            return NONE
        config = info.config
        # A USER that cannot be resolved raises (each command then fails with it):
        # running the image's commands as root instead would be the worse surprise.
        defaults = NONE if config == ImageConfig() else defaults_of(config, info.files.rootfs)
        with self._lock:
            self._cache[ref] = (info.directory, defaults)
        return defaults

    async def apply(self, ref: str, spec: S, sandbox_env: dict[str, str]) -> S:
        """``spec`` with the image's defaults under its own values and the sandbox's env."""
        defaults = self.cached(ref)
        if defaults is None:
            defaults = await anyio.to_thread.run_sync(self.load, ref)
        return defaults.apply(spec, sandbox_env)


_SHARED: dict[Path, ImageDefaults] = {}


def for_settings(settings: Settings) -> ImageDefaults:
    """One cache per images directory (the manager and the process service share it)."""
    key = settings.images_dir
    found = _SHARED.get(key)
    if found is None:
        found = _SHARED[key] = ImageDefaults(settings)
    return found
