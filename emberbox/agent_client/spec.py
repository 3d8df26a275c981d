"""A command request as one frozen value: :class:`ExecSpec` (run it to its end) and
:class:`SpawnSpec` (start it in the background).

A spec is built once, where the request comes in (an API route, ``emberbox run``, the
one-shot runner), and passed down unchanged to :meth:`AgentClient.exec
<emberbox.agent_client.client.AgentClient.exec>` or ``spawn``, as httpx passes one
``Request`` through ``handle_request``. A layer that fills in a default (the manager
merges the sandbox's env, caps the timeout, sets the output cap) makes a new spec with
:func:`dataclasses.replace`; no layer lists the fields again.

    ExecSpec(["python3", "-c", "print(6*7)"], timeout_s=10)
    ExecSpec("echo $GREETING >&2", env={"GREETING": "hi"})    # a string: /bin/sh -c
    SpawnSpec("python3 -m http.server 8000", pty=(80, 24))
    SpawnSpec(["id"], user=RunAs(1000, 1000, "user"))    # as uid 1000, user's groups
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from emberbox.agent_client.answers import ExecLimits

__all__ = ["CommandSpec", "ExecLimits", "ExecSpec", "RunAs", "SpawnSpec"]

S = TypeVar("S", bound="CommandSpec")


@dataclass(frozen=True)
class RunAs:
    """Who a command runs as (a spec without one runs as root, the agent's user).

    ``name`` gives the supplementary groups (``gid`` and the guest's ``/etc/group``
    entries that list it, as ``setpriv --init-groups``); None: none. ``no_new_privs``
    forbids the command to gain privileges (setuid binaries, sudo). An agent whose hello
    lists ``user`` switches itself (guest/runas.py); for an older one the command is
    wrapped with ``fallback`` (None: ``setpriv``), see :meth:`CommandSpec.for_agent`.
    The caller sets the environment (``HOME``, ``USER``, ``LOGNAME``).
    """

    uid: int
    gid: int
    name: str | None = None
    no_new_privs: bool = False
    fallback: tuple[str, ...] | None = None

    def wire(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "gid": self.gid,
            "name": self.name,
            "no_new_privs": self.no_new_privs,
        }

    def prefix(self) -> list[str]:
        """The argv prefix that switches to this user without the agent's help."""
        if self.fallback is not None:
            return list(self.fallback)
        groups = "--init-groups" if self.name else "--clear-groups"
        argv = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", groups]
        return [*argv, *(["--no-new-privs"] if self.no_new_privs else []), "--"]


@dataclass(frozen=True)
class CommandSpec:
    """What exec and spawn share.

    ``cmd`` is an argv (a list is kept as a tuple) or a shell line for ``/bin/sh -c``;
    ``env`` is added to the guest's environment; ``timeout_s`` (seconds, None: none)
    kills the command's process group; ``output_max_bytes`` caps the output kept;
    ``limits`` runs it in a cgroup of its own; ``user`` runs it as that user.
    """

    cmd: Sequence[str] | str
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    timeout_s: float | None = None
    output_max_bytes: int | None = None
    limits: ExecLimits | None = None
    user: RunAs | None = None

    def __post_init__(self) -> None:
        if isinstance(self.cmd, list):  # frozen, and equal whichever sequence it came as
            object.__setattr__(self, "cmd", tuple(self.cmd))

    @property
    def command(self) -> list[str] | str:
        """``cmd`` as the exec log stores it: a list is argv, a string a shell line."""
        return self.cmd if isinstance(self.cmd, str) else list(self.cmd)

    def wire(self) -> dict[str, Any]:
        """The request fields of docs/protocol.md (without ``op``)."""
        shell = isinstance(self.cmd, str)
        return {
            "argv": None if shell else list(self.cmd),
            "shell": self.cmd if shell else None,
            "env": dict(self.env),
            "cwd": self.cwd,
            "timeout_s": self.timeout_s,
            "output_max_bytes": self.output_max_bytes,
            "limits": None if self.limits is None else self.limits.wire(),
            "user": None if self.user is None else self.user.wire(),
        }

    def for_agent(self: S, switches_user: bool) -> S:
        """This spec as an agent can run it: as is if it switches users itself (its
        hello lists ``user``) or none is asked for; else with ``user`` made an argv
        prefix (``RunAs.prefix``), so that an older agent, which ignores the field, never
        runs the command as root."""
        if self.user is None or switches_user:
            return self
        argv = ["/bin/sh", "-c", self.cmd] if isinstance(self.cmd, str) else list(self.cmd)
        return dataclasses.replace(self, cmd=[*self.user.prefix(), *argv], user=None)


@dataclass(frozen=True)
class ExecSpec(CommandSpec):
    """A command to run and wait for; ``stdin`` is fed to it whole, then closed."""

    stdin: bytes | None = None

    def wire(self) -> dict[str, Any]:
        stdin = None if self.stdin is None else base64.b64encode(self.stdin).decode("ascii")
        return {**super().wire(), "stdin": stdin}


@dataclass(frozen=True)
class SpawnSpec(CommandSpec):
    """A command to start in its own session; ``pty=(cols, rows)`` puts it on a terminal.
    Its output waits in a buffer of ``output_max_bytes`` (default 1 MiB)."""

    pty: tuple[int, int] | None = None

    def wire(self) -> dict[str, Any]:
        pty = None if self.pty is None else {"cols": self.pty[0], "rows": self.pty[1]}
        return {**super().wire(), "pty": pty}
