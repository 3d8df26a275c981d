"""The agent's calls on a running guest, as one Protocol: :class:`AgentCalls`.

:class:`~emberbox.agent_client.client.AgentClient` is the real one (its docstrings say
what each call does); the service holds a sandbox's agent as ``AgentCalls``
(``SandboxHandle.agent``) and unit tests pass fakes of the same shape.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Protocol

from emberbox.agent_client.answers import ExecResult, FileInfo, ProcessInfo, ProcessStatus
from emberbox.agent_client.spec import ExecSpec, SpawnSpec

if TYPE_CHECKING:
    from emberbox.agent_client.client import AgentClient

#: Called with each chunk of output as it arrives (a coroutine function is awaited).
OutputCallback = Callable[[bytes], object]
#: Awaited with a started process's guest pid, before any of its output is passed on.
StartCallback = Callable[[int], Awaitable[None]]


class AgentCalls(Protocol):
    """Commands, background processes and files (docs/protocol.md, "Ops")."""

    async def exec(
        self,
        spec: ExecSpec,
        *,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> ExecResult: ...

    # -- background processes --------------------------------------------------------------
    async def spawn(self, spec: SpawnSpec) -> int: ...
    async def start(
        self,
        spec: SpawnSpec,
        on_start: StartCallback,
        *,
        close_stdin: bool = False,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> ProcessStatus: ...
    async def attach(
        self,
        pid: int,
        *,
        from_start: bool = True,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> ProcessStatus: ...
    async def write_stdin(
        self, pid: int, data: bytes | AsyncIterable[bytes], *, close: bool = False
    ) -> int: ...
    async def signal(self, pid: int, sig: str | int, *, group: bool = True) -> None: ...
    async def resize(self, pid: int, cols: int, rows: int) -> None: ...
    async def wait(self, pid: int, timeout_s: float | None = None) -> ProcessStatus: ...
    async def ps(self) -> list[ProcessInfo]: ...
    async def forget(self, pid: int) -> None: ...

    # -- files -----------------------------------------------------------------------------
    async def stat(self, path: str) -> FileInfo: ...
    async def list_dir(self, path: str) -> list[FileInfo]: ...
    def read_file(
        self, path: str, *, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]: ...
    async def write_file(
        self,
        path: str,
        data: bytes | AsyncIterable[bytes],
        *,
        mode: int = 0o644,
        offset: int = 0,
        truncate: bool = True,
    ) -> int: ...
    async def make_dir(self, path: str, *, parents: bool = True, mode: int = 0o755) -> None: ...
    async def remove(self, path: str, *, recursive: bool = False) -> None: ...
    async def rename(self, src: str, dst: str) -> None: ...
    def tar_out(self, path: str) -> AsyncIterator[bytes]: ...
    async def tar_in(self, path: str, data: AsyncIterable[bytes]) -> int: ...

    # ports (a TCP connection to 127.0.0.1:port in the guest)
    def connect(self, port: int) -> AbstractAsyncContextManager[ByteTunnel]: ...


class ByteTunnel(Protocol):
    """A byte stream to a server in the guest (:class:`~emberbox.agent_client.tunnel.Tunnel`)."""

    port: int

    async def send(self, data: bytes) -> None: ...
    async def send_eof(self) -> None: ...
    async def receive(self) -> bytes: ...  # b"" once the server closed its side


def _client_has_every_call(client: AgentClient) -> AgentCalls:
    """(For mypy) the real client fits the Protocol."""
    return client


__all__ = ["AgentCalls", "ByteTunnel", "OutputCallback"]
