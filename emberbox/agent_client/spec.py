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
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from emberbox.agent_client.answers import ExecLimits

__all__ = ["CommandSpec", "ExecLimits", "ExecSpec", "SpawnSpec"]


@dataclass(frozen=True)
class CommandSpec:
    """What exec and spawn share.

    ``cmd`` is an argv (a list is kept as a tuple) or a shell line for ``/bin/sh -c``;
    ``env`` is added to the guest's environment; ``timeout_s`` (seconds, None: none)
    kills the command's process group; ``output_max_bytes`` caps the output kept;
    ``limits`` runs it in a cgroup of its own.
    """

    cmd: Sequence[str] | str
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    timeout_s: float | None = None
    output_max_bytes: int | None = None
    limits: ExecLimits | None = None

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
        }


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
