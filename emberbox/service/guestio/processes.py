"""Background processes of running sandboxes (``manager.processes``): start, follow,
feed, signal, resize, list and end them.

A process runs in its own session in the guest: it outlives the request that started
it and any exec, and it ends with its own timeout (none by default), a signal, or the
sandbox. Its output waits in a ring buffer in the guest (1 MiB) for whoever follows it.
"""

from __future__ import annotations

import builtins
import contextlib
from collections.abc import AsyncIterable
from typing import TYPE_CHECKING

import anyio

from emberbox import errors
from emberbox.agent_client.spec import SpawnSpec
from emberbox.service.guestio.common import GuestService
from emberbox.service.images import defaults as image_defaults
from emberbox.service.sandboxes.manager import OutputCallback
from emberbox.service.sandboxes.validation import check_frame, validate_command

if TYPE_CHECKING:
    from emberbox.agent_client.calls import StartCallback
    from emberbox.agent_client.client import ProcessInfo, ProcessStatus
    from emberbox.service.sandboxes.manager import SandboxRecord

# A terminal's program (the pty route's) when the client names none: a login shell, bash
# where there is one.
TERMINAL_SHELL = "command -v bash >/dev/null 2>&1 && exec bash -l; exec sh -l"
MAX_TERMINAL_CELLS = 1000  # columns or rows
END_WAIT_S = 5.0  # after SIGKILL, how long to wait for the agent to reap the group


class Processes(GuestService):
    """The background processes of the manager's running sandboxes."""

    async def spawn(self, sandbox_id: str, spec: SpawnSpec) -> int:
        """Start ``spec`` (its ``cmd``: argv, or a string for ``sh -c``); returns its guest
        pid at once.

        ``env`` is merged over the sandbox's env; ``timeout_s`` (seconds, None: none)
        kills its process group; ``pty=(cols, rows)`` runs it on a terminal.
        """
        _validate(spec)
        async with self._guest(sandbox_id) as (record, agent):
            return await agent.spawn(await self._merged(record, spec))

    async def start(
        self,
        sandbox_id: str,
        spec: SpawnSpec,
        on_start: StartCallback,
        *,
        close_stdin: bool = False,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> ProcessStatus:
        """:meth:`spawn` and :meth:`follow` from its start, in one agent request where
        the guest's agent can: ``on_start(pid)`` is awaited before any output is passed
        on, and ``close_stdin`` (no PTY) ends its stdin at once. Returns how it ended."""
        _validate(spec)
        async with self._guest(sandbox_id) as (record, agent):
            merged = await self._merged(record, spec)
            return await agent.start(
                merged, on_start, close_stdin=close_stdin, on_stdout=on_stdout, on_stderr=on_stderr
            )

    async def _merged(self, record: SandboxRecord, spec: SpawnSpec) -> SpawnSpec:
        """`spec` with the image's and the sandbox's defaults (env, cwd, user)."""
        defaults = image_defaults.for_settings(self._settings)
        merged = await defaults.apply(record.image, spec, record.env)
        check_frame(merged)  # with the sandbox's env in it
        return merged

    async def follow(
        self,
        sandbox_id: str,
        pid: int,
        *,
        from_start: bool = True,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> ProcessStatus:
        """Pass the process's output to the callbacks (its buffer first, with
        ``from_start``) until it ends; returns how it ended. On a terminal all output
        is stdout."""
        async with self._guest(sandbox_id) as (_, agent):
            return await agent.attach(
                pid, from_start=from_start, on_stdout=on_stdout, on_stderr=on_stderr
            )

    async def status(self, sandbox_id: str, pid: int) -> ProcessStatus:
        """Whether it still runs and, if it ended, how (without waiting)."""
        return await self.wait(sandbox_id, pid, None)

    async def wait(self, sandbox_id: str, pid: int, timeout_s: float | None) -> ProcessStatus:
        """Its status once it ended or ``timeout_s`` seconds passed (None: no waiting)."""
        async with self._guest(sandbox_id) as (_, agent):
            return await agent.wait(pid, timeout_s)

    async def list(self, sandbox_id: str) -> builtins.list[ProcessInfo]:
        async with self._guest(sandbox_id) as (_, agent):
            return await agent.ps()

    async def write_stdin(
        self,
        sandbox_id: str,
        pid: int,
        data: bytes | AsyncIterable[bytes],
        *,
        close: bool = False,
        size: int | None = None,
    ) -> int:
        """Feed ``data`` to its stdin (at most ``max_upload_bytes`` at once); ``close``
        ends its stdin afterwards. Returns the bytes delivered."""
        if isinstance(data, bytes):
            self.check_upload_size(len(data))
            async with self._guest(sandbox_id) as (_, agent):
                return await agent.write_stdin(pid, data, close=close)
        self.check_upload_size(size)
        counted = self._counted(data)
        async with self._guest(sandbox_id) as (_, agent):
            written = await agent.write_stdin(pid, counted, close=close)
        counted.check()
        return written

    async def signal(
        self, sandbox_id: str, pid: int, sig: str | int, *, group: bool = True
    ) -> None:
        if isinstance(sig, str):
            sig = sig.upper().removeprefix("SIG")
        async with self._guest(sandbox_id) as (_, agent):
            await agent.signal(pid, sig, group=group)

    async def resize(self, sandbox_id: str, pid: int, cols: int, rows: int) -> None:
        """Resize its terminal (it gets SIGWINCH); Conflict when it has none."""
        _check_size(cols, rows)
        async with self._guest(sandbox_id) as (_, agent):
            await agent.resize(pid, cols, rows)

    async def forget(self, sandbox_id: str, pid: int) -> None:
        """Drop an ended process's record and output buffer."""
        async with self._guest(sandbox_id) as (_, agent):
            await agent.forget(pid)

    async def end(self, sandbox_id: str, pid: int) -> None:
        """Kill the process's group and forget it (a terminal whose client left). Quiet
        when it already ended or the sandbox is gone; runs even on cancellation."""
        with (
            anyio.CancelScope(shield=True),
            anyio.move_on_after(END_WAIT_S + 5),
            contextlib.suppress(errors.EmberboxError),
        ):
            async with self._guest(sandbox_id) as (_, agent):
                if (await agent.wait(pid, None)).running:
                    await agent.signal(pid, "KILL", group=True)
                    await agent.wait(pid, END_WAIT_S)
                await agent.forget(pid)


def _validate(spec: SpawnSpec) -> None:
    validate_command(spec)
    if spec.pty is not None:
        _check_size(*spec.pty)


def _check_size(cols: int, rows: int) -> None:
    for name, value in (("cols", cols), ("rows", rows)):
        if not isinstance(value, int) or not 1 <= value <= MAX_TERMINAL_CELLS:
            raise errors.InvalidRequest(
                f"{name} must be from 1 to {MAX_TERMINAL_CELLS} (got {value!r})", field=name
            )
