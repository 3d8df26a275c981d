"""Host side of the agent protocol (asyncio): requests over one byte stream to the agent.

:class:`AgentClient` wraps the ``(StreamReader, StreamWriter)`` pair a VMM driver gives
back (through :class:`~emberbox.agent_client.link.AgentLink`, which routes frames by request
id, so any number of requests, streaming ones included, share the one stream). Its
methods are the ops of docs/protocol.md: commands, background processes, files.
Error answers raise the matching :mod:`emberbox.errors` class (NotFound,
InvalidRequest, Conflict, else AgentRequestFailed).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import inspect
import os
import time
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from emberbox import errors
from emberbox.agent_client.answers import (
    ExecLimits,
    ExecResult,
    FileInfo,
    FileType,
    HelloInfo,
    ProcessInfo,
    ProcessStatus,
    exec_result_from,
    file_info_from,
    file_infos_from,
    hello_info_from,
    process_infos_from,
    process_status_from,
    spawned_pid,
)
from emberbox.agent_client.calls import AgentCalls, OutputCallback, StartCallback
from emberbox.agent_client.link import AgentLink, checked
from emberbox.agent_client.spec import ExecSpec, SpawnSpec
from emberbox.agent_client.tunnel import Tunnel, open_tunnel
from emberbox.guest import protocol
from emberbox.guest.protocol import Op

__all__ = [
    "AgentCalls",
    "AgentClient",
    "ExecLimits",
    "ExecResult",
    "ExecSpec",
    "FileInfo",
    "FileType",
    "HelloInfo",
    "OutputCallback",
    "ProcessInfo",
    "ProcessStatus",
    "SpawnSpec",
    "Tunnel",
    "WarmProgram",
]

HELLO_RESEND_S = 0.5
EXEC_GRACE_S = 15.0  # how long past its own timeout an exec may take to be answered
EXEC_OUTPUT_MAX_BYTES = 16 << 20  # an exec's output cap when its spec names none


@dataclass(frozen=True)
class WarmProgram:
    """A ``run``'s ``warm`` field: ``script`` with ``args``, forked from the guest's warm
    ``runtime`` as ``uid``/``gid`` (None: root's)."""

    runtime: str
    script: str
    args: list[str]
    uid: int | None = None
    gid: int | None = None


class AgentClient:
    """Requests to the guest agent over one stream; use ``async with`` or ``aclose()``.

    Create it inside a running event loop: it starts its reader task at once.

    Example::

        async with AgentClient(reader, writer) as agent:
            await agent.handshake(timeout_s=30)
            result = await agent.exec(ExecSpec(["uname", "-a"], timeout_s=10))
            await agent.write_file("/tmp/x", b"data")
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._link = AgentLink(reader, writer)
        self.ready = self._link.ready  # set by the agent's "ready" event
        # What the agent's last hello listed (protocol.FEATURES); none until one is
        # answered, so a spec's user is then switched by a wrapper (CommandSpec.for_agent).
        self.features: frozenset[str] = frozenset()

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def closed(self) -> bool:
        return self._link.closed

    @property
    def violation(self) -> str | None:
        """Why the agent was cut off, if it broke the protocol (bad frames, a budget)."""
        return self._link.violation

    async def aclose(self) -> None:
        """Close the stream; pending requests raise AgentDisconnected. Idempotent."""
        await self._link.aclose()

    async def handshake(
        self,
        *,
        timeout_s: float,
        hostname: str | None = None,
        sandbox_id: str | None = None,
        entropy: bytes | None = None,
        set_time: bool = True,
    ) -> HelloInfo:
        """Say hello (resent every 0.5 s until answered); raises BootTimeout after timeout_s.

        The agent may not be listening yet when the first hello goes out, and on a
        virtio-serial port early bytes can be lost, hence the resends.
        """
        body = {
            "op": Op.HELLO,
            "protocol": protocol.PROTOCOL_VERSION,
            "entropy": base64.b64encode(entropy or os.urandom(64)).decode("ascii"),
            "hostname": hostname,
            "sandbox_id": sandbox_id,
        }

        def hello() -> dict[str, Any]:
            return {**body, "time_ns": time.time_ns() if set_time else None}

        reply = await self._link.first_answer(hello, timeout_s, HELLO_RESEND_S)
        if reply is None:
            raise errors.BootTimeout(f"agent did not answer the handshake within {timeout_s} s")
        answer = checked(reply)
        if answer.get("protocol") != protocol.PROTOCOL_VERSION:
            raise errors.ProtocolError(
                f"agent speaks protocol {answer.get('protocol')!r}, "
                f"we speak {protocol.PROTOCOL_VERSION}"
            )
        return self._greeted(hello_info_from(answer))

    async def configure_network(
        self, network: dict[str, Any] | None, *, timeout_s: float = 20.0
    ) -> HelloInfo:
        """A hello that only sets up the guest's NIC (``network``; see guest/netconf.py)
        or takes it down (None). Raises AgentRequestFailed when the guest cannot."""
        hello = {"protocol": protocol.PROTOCOL_VERSION, "network": network}
        answer = await asyncio.wait_for(self.request(Op.HELLO, **hello), timeout_s)
        return self._greeted(hello_info_from(answer))

    def _greeted(self, info: HelloInfo) -> HelloInfo:
        self.features = info.features
        return info

    @property
    def switches_user(self) -> bool:
        """Whether the agent runs a spec's ``user`` itself (else the spec is wrapped)."""
        return protocol.FEATURE_USER in self.features

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Any request; returns the agent's answer, raises on an error answer."""
        return await self._link.request({"op": op, **fields})

    async def ping(self) -> None:
        await self.request(Op.PING)

    async def shutdown(self) -> None:
        """Ask the guest to power off; the channel closing right after is expected."""
        with contextlib.suppress(errors.AgentDisconnected):
            await self.request(Op.SHUTDOWN)

    # -- commands --------------------------------------------------------------------------

    async def exec(
        self,
        spec: ExecSpec,
        *,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> ExecResult:
        """Run ``spec.cmd`` (a sequence: argv; a string: ``/bin/sh -c``) and wait for it to end.

        ``on_stdout``/``on_stderr`` get each chunk as it arrives (coroutines are awaited).
        A command past ``spec.timeout_s`` is killed by the agent (``timed_out=True``); if
        the agent does not answer within ``timeout_s + 15`` seconds, ExecTimeout is raised.
        ``spec.limits`` runs it in a cgroup of its own (``memory_limited``,
        ``peak_memory_kib``). The output (stdout and stderr together) is capped at
        ``spec.output_max_bytes`` (default 16 MiB) on both sides: an agent that sends
        more breaks the protocol (ProtocolError).
        """
        result, _ = await self._exec(spec, {"op": Op.EXEC}, on_stdout, on_stderr)
        return result

    async def run(
        self,
        spec: ExecSpec,
        *,
        tar: bytes | None = None,
        tar_dir: str | None = None,
        warm: WarmProgram | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> tuple[ExecResult, bool]:
        """:meth:`exec` in one call with what a one-shot run needs: ``tar`` extracted into
        ``tar_dir`` first, and ``warm``: run by the guest's warm runtime when it can
        (docs/protocol.md, ``run``). Returns the result and whether it ran warm."""
        if warm is not None and spec.user is not None:
            raise errors.InvalidRequest("a warm run takes its uid and gid in `warm`, not `user`")
        extra: dict[str, Any] = {"op": Op.RUN}
        if tar is not None:
            extra.update(tar=base64.b64encode(tar).decode("ascii"), tar_dir=tar_dir)
        if warm is not None:
            extra["warm"] = dataclasses.asdict(warm)
        return await self._exec(spec, extra, on_stdout, on_stderr)

    async def warm(self, runtimes: list[str], *, timeout_s: float = 180.0) -> list[str]:
        """Start the guest's warm runtimes (``warm``); returns those that are ready."""
        answer = await asyncio.wait_for(self.request(Op.WARM, runtimes=runtimes), timeout_s)
        return [str(name) for name in answer.get("runtimes", [])]

    async def _exec(
        self,
        spec: ExecSpec,
        extra: dict[str, Any],
        on_stdout: OutputCallback | None,
        on_stderr: OutputCallback | None,
    ) -> tuple[ExecResult, bool]:
        if spec.output_max_bytes is None:
            spec = dataclasses.replace(spec, output_max_bytes=EXEC_OUTPUT_MAX_BYTES)
        cap = spec.output_max_bytes
        output = _Output(on_stdout, on_stderr)
        body = {**spec.for_agent(self.switches_user).wire(), **extra}
        deadline = None if spec.timeout_s is None else spec.timeout_s + EXEC_GRACE_S
        request = self._link.request(body, output.feed, data_limit=cap)
        try:
            answer = await asyncio.wait_for(request, deadline)
        except TimeoutError:
            raise errors.ExecTimeout(
                f"agent did not answer an exec within {deadline} s", result=None
            ) from None
        result = exec_result_from(answer, bytes(output.stdout), bytes(output.stderr))
        return result, answer.get("warm") is True

    # -- background processes --------------------------------------------------------------

    async def spawn(self, spec: SpawnSpec) -> int:
        """Start ``spec.cmd`` in the background, in its own session; returns its guest pid.

        ``spec.pty=(cols, rows)`` runs it on a terminal; ``spec.user`` as that user (by
        the agent, or by a ``setpriv`` wrapper for agents that cannot). Its output is
        kept in a buffer of ``spec.output_max_bytes`` (default 1 MiB, oldest bytes
        dropped) for :meth:`attach`.
        """
        body = {**spec.for_agent(self.switches_user).wire(), "op": Op.SPAWN}
        return int((await self._link.request(body))["pid"])

    async def attach(
        self,
        pid: int,
        *,
        from_start: bool = True,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> ProcessStatus:
        """Follow a spawned process's output (its buffer first, with ``from_start``)
        until it ends; returns how it ended. With a PTY all output is stdout."""
        output = _Output(on_stdout, on_stderr, keep=False)
        body = {"op": Op.ATTACH, "pid": pid, "from_start": from_start}
        return process_status_from(await self._link.request(body, output.feed))

    async def start(
        self,
        spec: SpawnSpec,
        on_start: StartCallback,
        *,
        close_stdin: bool = False,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> ProcessStatus:
        """:meth:`spawn` and :meth:`attach` from its start: ``on_start(pid)`` is awaited
        before any output is passed on; ``close_stdin`` (no PTY) ends its stdin at once.
        Returns how it ended. One request to an agent that lists
        ``FEATURE_SPAWN_ATTACH``; spawn, close and attach one after the other otherwise.
        """
        close_stdin = close_stdin and spec.pty is None
        if protocol.FEATURE_SPAWN_ATTACH not in self.features:
            return await self._start_in_steps(spec, on_start, close_stdin, on_stdout, on_stderr)
        output, started = _Output(on_stdout, on_stderr, keep=False), False

        async def on_frame(frame: protocol.Frame) -> None:
            nonlocal started
            if frame.kind is protocol.Kind.EVENT and not started:
                started = True
                await on_start(spawned_pid(frame.json()))
            elif not started:
                raise errors.ProtocolError("agent sent output before the spawned event")
            else:
                await output.feed(frame)

        extra = {"op": Op.SPAWN, "attach": True, "close_stdin": close_stdin}
        body = {**spec.for_agent(self.switches_user).wire(), **extra}
        answer = await self._link.request(body, on_frame)
        if not started:
            raise errors.ProtocolError("agent answered spawn-attach without a spawned event")
        return process_status_from(answer)

    async def _start_in_steps(
        self,
        spec: SpawnSpec,
        on_start: StartCallback,
        close_stdin: bool,
        on_stdout: OutputCallback | None,
        on_stderr: OutputCallback | None,
    ) -> ProcessStatus:
        pid = await self.spawn(spec)
        await on_start(pid)
        if close_stdin:
            with contextlib.suppress(errors.Conflict):  # it may have ended already
                await self.write_stdin(pid, b"", close=True)
        return await self.attach(pid, on_stdout=on_stdout, on_stderr=on_stderr)

    async def write_stdin(
        self, pid: int, data: bytes | AsyncIterable[bytes], *, close: bool = False
    ) -> int:
        """Write to a spawned process's stdin; returns the bytes written. ``close``
        closes stdin afterwards (on a PTY: sends the terminal's end-of-file, ^D)."""
        body = {"op": Op.WRITE_STDIN, "pid": pid, "close": close}
        return int((await self._link.upload(body, data))["written"])

    async def signal(self, pid: int, sig: str | int, *, group: bool = True) -> None:
        """Send ``sig`` (``"TERM"``, ``"SIGKILL"``, 15) to the process (its group)."""
        await self.request(Op.SIGNAL, pid=pid, signal=sig, group=group)

    async def resize(self, pid: int, cols: int, rows: int) -> None:
        """Resize a spawned process's PTY (Conflict if it has none)."""
        await self.request(Op.RESIZE, pid=pid, cols=cols, rows=rows)

    async def wait(self, pid: int, timeout_s: float | None = None) -> ProcessStatus:
        """The process's status after waiting up to ``timeout_s`` (None: no wait)."""
        return process_status_from(await self.request(Op.WAIT, pid=pid, timeout_s=timeout_s))

    async def ps(self) -> list[ProcessInfo]:
        """Every spawned process the agent remembers, running or ended."""
        return process_infos_from(await self.request(Op.PS))

    async def forget(self, pid: int) -> None:
        """Drop an ended process's record and buffer (Conflict while it runs)."""
        await self.request(Op.FORGET, pid=pid)

    # -- files (paths in the guest: relative ones from /) ----------------------------------

    async def stat(self, path: str) -> FileInfo:
        """The file at ``path`` (not following a final symlink)."""
        return file_info_from(path, await self.request(Op.STAT, path=path))

    async def list_dir(self, path: str) -> list[FileInfo]:
        """The directory's entries, sorted by name."""
        return file_infos_from(path, await self.request(Op.LIST, path=path))

    def read_file(
        self, path: str, *, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        """The file's bytes from ``offset`` (``length`` of them, None: to the end) in
        chunks of at most 64 KiB, streamed as the caller consumes them."""
        return self._link.download(
            {"op": Op.READ, "path": path, "offset": offset, "length": length}
        )

    async def write_file(
        self,
        path: str,
        data: bytes | AsyncIterable[bytes],
        *,
        mode: int = 0o644,
        offset: int = 0,
        truncate: bool = True,
    ) -> int:
        """Write ``data`` at ``offset`` as it comes; returns the bytes written. ``mode``
        applies to a new file; ``truncate`` makes the file end where the data ends."""
        body = {
            "op": Op.WRITE,
            "path": path,
            "mode": mode,
            "offset": offset,
            "truncate": truncate,
        }
        return int((await self._link.upload(body, data))["written"])

    async def make_dir(self, path: str, *, parents: bool = True, mode: int = 0o755) -> None:
        await self.request(Op.MKDIR, path=path, parents=parents, mode=mode)

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        await self.request(Op.REMOVE, path=path, recursive=recursive)

    async def rename(self, src: str, dst: str) -> None:
        await self.request(Op.RENAME, src=src, dst=dst)

    def tar_out(self, path: str) -> AsyncIterator[bytes]:
        """A POSIX tar stream of ``path``: a directory's contents, or one file."""
        return self._link.download({"op": Op.TAR_OUT, "path": path})

    async def tar_in(self, path: str, data: AsyncIterable[bytes]) -> int:
        """Extract the tar stream ``data`` into the directory ``path`` (made if missing);
        returns the member count. Unsafe members fail it with InvalidRequest."""
        return int((await self._link.upload({"op": Op.TAR_IN, "path": path}, data))["entries"])

    def connect(self, port: int) -> contextlib.AbstractAsyncContextManager[Tunnel]:
        """A TCP connection to ``127.0.0.1:port`` in the guest, relayed over the channel.

        >>> async with agent.connect(8000) as tunnel:
        ...     await tunnel.send(b"GET / HTTP/1.0\\r\\n\\r\\n")
        ...     first = await tunnel.receive()
        """
        return open_tunnel(self._link, port)


class _Output:
    """Collects output (unless not `keep`) and passes each chunk to the callbacks."""

    def __init__(
        self,
        on_stdout: OutputCallback | None,
        on_stderr: OutputCallback | None,
        keep: bool = True,
    ) -> None:
        self.stdout, self.stderr = bytearray(), bytearray()
        self._keep = keep
        self._callbacks = {protocol.Kind.STDOUT: on_stdout, protocol.Kind.STDERR: on_stderr}

    async def feed(self, frame: protocol.Frame) -> None:
        if frame.kind not in self._callbacks:
            return
        if self._keep:
            (self.stdout if frame.kind is protocol.Kind.STDOUT else self.stderr).extend(
                frame.payload
            )
        callback = self._callbacks[frame.kind]
        if callback is not None:
            outcome = callback(frame.payload)
            if inspect.isawaitable(outcome):
                await outcome
