"""The agent's calls on a running sandbox, passed through: exec, background processes
and files (docs/protocol.md). :class:`~emberbox.service.vm.machine.Sandbox` inherits them."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import TYPE_CHECKING

from emberbox.agent_client.client import AgentClient, ExecLimits, ExecResult

if TYPE_CHECKING:
    from emberbox.agent_client.client import FileInfo, ProcessInfo, ProcessStatus

OutputCallback = Callable[[bytes], object]


class AgentCalls:
    """What a sandbox does through its agent connection, ``self.agent``."""

    agent: AgentClient

    async def exec(
        self,
        cmd: list[str] | str,
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout_s: float | None = None,
        stdin: bytes | None = None,
        output_max_bytes: int | None = None,
        limits: ExecLimits | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> ExecResult:
        """Run ``cmd`` (argv list, or a string for ``/bin/sh -c``) and wait for it.

        A command that runs past ``timeout_s`` is killed with its process group and
        comes back with ``timed_out=True``. ``limits`` puts it in a cgroup of its own.
        """
        return await self.agent.exec(
            cmd,
            env=env,
            cwd=cwd,
            timeout_s=timeout_s,
            stdin=stdin,
            output_max_bytes=output_max_bytes,
            limits=limits,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
        )

    # -- background processes (the agent's own calls; see docs/protocol.md) ----------------

    async def spawn(
        self,
        cmd: list[str] | str,
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout_s: float | None = None,
        output_max_bytes: int | None = None,
        pty: tuple[int, int] | None = None,
    ) -> int:
        """Start ``cmd`` in its own session and return its guest pid at once. It outlives
        this call and other execs; ``pty=(cols, rows)`` runs it on a terminal."""
        return await self.agent.spawn(
            cmd,
            env=env,
            cwd=cwd,
            timeout_s=timeout_s,
            output_max_bytes=output_max_bytes,
            pty=pty,
        )

    async def attach_process(
        self,
        pid: int,
        *,
        from_start: bool = True,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> ProcessStatus:
        """Follow a spawned process's output (its buffer first, with ``from_start``) until
        it ends; returns how it ended."""
        return await self.agent.attach(
            pid, from_start=from_start, on_stdout=on_stdout, on_stderr=on_stderr
        )

    async def write_stdin(
        self, pid: int, data: bytes | AsyncIterable[bytes], *, close: bool = False
    ) -> int:
        return await self.agent.write_stdin(pid, data, close=close)

    async def signal(self, pid: int, sig: str | int, *, group: bool = True) -> None:
        await self.agent.signal(pid, sig, group=group)

    async def resize(self, pid: int, cols: int, rows: int) -> None:
        await self.agent.resize(pid, cols, rows)

    async def wait_process(self, pid: int, timeout_s: float | None = None) -> ProcessStatus:
        """The process's status, after waiting up to ``timeout_s`` for it to end."""
        return await self.agent.wait(pid, timeout_s)

    async def ps(self) -> list[ProcessInfo]:
        return await self.agent.ps()

    async def forget(self, pid: int) -> None:
        await self.agent.forget(pid)

    # -- files (paths are resolved by the guest: relative to /, its symlinks followed) -----

    async def stat(self, path: str) -> FileInfo:
        return await self.agent.stat(path)

    async def list_dir(self, path: str) -> list[FileInfo]:
        return await self.agent.list_dir(path)

    def read_file(
        self, path: str, *, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        """The file's bytes, streamed in chunks of at most 64 KiB."""
        return self.agent.read_file(path, offset=offset, length=length)

    async def write_file(
        self,
        path: str,
        data: bytes | AsyncIterable[bytes],
        *,
        mode: int = 0o644,
        offset: int = 0,
        truncate: bool = True,
    ) -> int:
        """Write ``data`` as it comes (never whole in memory); returns the bytes written."""
        return await self.agent.write_file(path, data, mode=mode, offset=offset, truncate=truncate)

    async def make_dir(self, path: str, *, parents: bool = True, mode: int = 0o755) -> None:
        await self.agent.make_dir(path, parents=parents, mode=mode)

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        await self.agent.remove(path, recursive=recursive)

    async def rename(self, src: str, dst: str) -> None:
        await self.agent.rename(src, dst)

    def tar_out(self, path: str) -> AsyncIterator[bytes]:
        """A POSIX tar stream of ``path`` (a directory or a file)."""
        return self.agent.tar_out(path)

    async def tar_in(self, path: str, data: AsyncIterable[bytes]) -> int:
        """Extract a tar stream into the directory ``path``; returns the member count."""
        return await self.agent.tar_in(path, data)
