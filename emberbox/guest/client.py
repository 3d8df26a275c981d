"""Host side of the agent protocol (asyncio): requests over one byte stream to the agent.

:class:`AgentClient` wraps the ``(StreamReader, StreamWriter)`` pair a VMM driver gives
back. A reader task routes frames by request id, so any number of requests (``exec``
streaming output included) share the one stream. Foreign errors are translated here,
at the boundary: a closed stream is :class:`~emberbox.errors.AgentDisconnected`, bytes
that are not frames are :class:`~emberbox.errors.ProtocolError`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from emberbox import errors
from emberbox.guest import protocol

HELLO_RESEND_S = 0.5
EXEC_GRACE_S = 15.0  # how long past its own timeout an exec may take to be answered
READ_SIZE = 64 * 1024

OutputCallback = Callable[[bytes], object]


@dataclass(frozen=True)
class ExecResult:
    """What a finished command left: exit code, its output and how long it ran."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    duration_ms: float
    timed_out: bool = False
    output_truncated: bool = False
    signal: int | None = None


@dataclass(frozen=True)
class HelloInfo:
    """The agent's answer to the handshake."""

    protocol: int
    agent_version: str
    boot_time: float
    kernel: str
    warnings: tuple[str, ...] = ()  # what the agent could not do (clock, entropy, ...)


_CLOSED = object()  # queued to every pending call when the channel fails


class AgentClient:
    """Requests to the guest agent over one stream; use ``async with`` or ``aclose()``.

    Create it inside a running event loop: it starts its reader task at once.

    Example::

        async with AgentClient(reader, writer) as agent:
            await agent.handshake(timeout_s=30)
            result = await agent.exec(["uname", "-a"], timeout_s=10)
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._calls: dict[int, asyncio.Queue[protocol.Frame | object]] = {}
        self._write_lock = asyncio.Lock()
        self._failure: tuple[type[errors.AgentError], str] | None = None
        self.ready = asyncio.Event()  # set by the agent's "ready" event
        self._task = asyncio.get_running_loop().create_task(self._read_loop())

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
        return self._failure is not None

    async def aclose(self) -> None:
        """Close the stream; pending requests raise AgentDisconnected. Idempotent."""
        self._fail(errors.AgentDisconnected, "agent channel closed")
        if not self._task.done():
            self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._writer.close()
        with contextlib.suppress(OSError, RuntimeError):  # the peer may be gone already
            await self._writer.wait_closed()

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
            "op": "hello",
            "protocol": protocol.PROTOCOL_VERSION,
            "entropy": base64.b64encode(entropy or os.urandom(64)).decode("ascii"),
            "hostname": hostname,
            "sandbox_id": sandbox_id,
        }
        reply = await self._hello_until_answered(body, timeout_s, set_time)
        answer = _checked(reply)
        if answer.get("protocol") != protocol.PROTOCOL_VERSION:
            raise errors.ProtocolError(
                f"agent speaks protocol {answer.get('protocol')!r}, "
                f"we speak {protocol.PROTOCOL_VERSION}"
            )
        return _hello_info(answer)

    async def exec(
        self,
        cmd: list[str] | str,
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout_s: float | None = None,
        stdin: bytes | None = None,
        output_max_bytes: int | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> ExecResult:
        """Run a command (list: argv; str: ``/bin/sh -c``) and wait for it to end.

        ``on_stdout``/``on_stderr`` get each chunk as it arrives (coroutines are awaited).
        A command past ``timeout_s`` is killed by the agent (``timed_out=True``); if the
        agent does not answer within ``timeout_s + 15`` seconds, ExecTimeout is raised.
        """
        body: dict[str, Any] = {
            "op": "exec",
            "argv": cmd if isinstance(cmd, list) else None,
            "shell": cmd if isinstance(cmd, str) else None,
            "env": env or {},
            "cwd": cwd,
            "timeout_s": timeout_s,
            "stdin": base64.b64encode(stdin).decode("ascii") if stdin is not None else None,
            "output_max_bytes": output_max_bytes,
        }
        output = _Output(on_stdout, on_stderr)
        deadline = None if timeout_s is None else timeout_s + EXEC_GRACE_S
        try:
            reply = await asyncio.wait_for(self._call(body, output.feed), deadline)
        except TimeoutError:
            raise errors.ExecTimeout(
                f"agent did not answer an exec within {deadline} s", result=None
            ) from None
        return output.result(_checked(reply))

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Any request; returns the agent's answer, raises on an error answer."""
        return _checked(await self._call({"op": op, **fields}))

    async def ping(self) -> None:
        await self.request("ping")

    async def shutdown(self) -> None:
        """Ask the guest to power off; the channel closing right after is expected."""
        with contextlib.suppress(errors.AgentDisconnected):
            await self.request("shutdown")

    async def _call(
        self,
        body: dict[str, Any],
        on_data: Callable[[protocol.Frame], Any] | None = None,
    ) -> dict[str, Any]:
        """Send one request and wait for its RESPONSE, passing data frames to on_data."""
        rid, frames = self._open_call()
        try:
            await self._send(protocol.encode_json(protocol.Kind.REQUEST, rid, body))
            while True:
                frame = self._frame_or_raise(await frames.get())
                if frame.kind is protocol.Kind.RESPONSE:
                    return frame.json()
                if on_data is not None:
                    await on_data(frame)
        finally:
            self._calls.pop(rid, None)

    async def _hello_until_answered(
        self, body: dict[str, Any], timeout_s: float, set_time: bool
    ) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        answers: asyncio.Queue[protocol.Frame | object] = asyncio.Queue()
        rids: list[int] = []  # all share one queue: the first answer to any of them wins
        try:
            while (left := deadline - loop.time()) > 0:
                rid = next(self._ids)
                rids.append(rid)
                self._calls[rid] = answers
                hello = {**body, "time_ns": time.time_ns() if set_time else None}
                await self._send(protocol.encode_json(protocol.Kind.REQUEST, rid, hello))
                reply = await self._next_response(answers, min(HELLO_RESEND_S, left))
                if reply is not None:
                    return reply
        finally:
            for rid in rids:  # later answers find no call and are dropped
                self._calls.pop(rid, None)
        raise errors.BootTimeout(f"agent did not answer the handshake within {timeout_s} s")

    async def _next_response(
        self, frames: asyncio.Queue[protocol.Frame | object], wait_s: float
    ) -> dict[str, Any] | None:
        try:
            async with asyncio.timeout(wait_s):
                while True:
                    frame = self._frame_or_raise(await frames.get())
                    if frame.kind is protocol.Kind.RESPONSE:
                        return frame.json()
        except TimeoutError:
            return None

    def _open_call(self) -> tuple[int, asyncio.Queue[protocol.Frame | object]]:
        self._raise_if_failed()
        rid = next(self._ids)
        frames: asyncio.Queue[protocol.Frame | object] = asyncio.Queue()
        self._calls[rid] = frames
        return rid, frames

    def _frame_or_raise(self, item: protocol.Frame | object) -> protocol.Frame:
        if isinstance(item, protocol.Frame):
            return item
        self._raise_if_failed()
        raise errors.AgentDisconnected("agent channel closed")  # not reached: failed

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            cls, message = self._failure
            raise cls(message)  # a fresh instance per caller: tracebacks are per raise

    async def _send(self, data: bytes) -> None:
        async with self._write_lock:
            self._raise_if_failed()
            try:
                self._writer.write(data)
                await self._writer.drain()
            except (ConnectionError, OSError) as exc:
                self._fail(errors.AgentDisconnected, "agent channel closed")
                raise errors.AgentDisconnected(f"agent channel closed: {exc}") from exc

    async def _read_loop(self) -> None:
        decoder = protocol.FrameDecoder()
        try:
            while data := await self._reader.read(READ_SIZE):
                for frame in decoder.feed(data):
                    self._route(frame)
        except protocol.ProtocolViolation as exc:
            self._fail(errors.ProtocolError, f"agent sent bytes that are not frames: {exc}")
            self._writer.close()
        except (ConnectionError, OSError):
            pass
        finally:  # whatever ended the loop, no answer can come any more
            self._fail(errors.AgentDisconnected, "agent channel closed")

    def _route(self, frame: protocol.Frame) -> None:
        if frame.rid == 0 and frame.kind is protocol.Kind.EVENT:
            if frame.json().get("event") == "ready":
                self.ready.set()
            return
        calls = self._calls.get(frame.rid)
        if calls is not None:  # else a late answer to a request given up on: dropped
            calls.put_nowait(frame)

    def _fail(self, cls: type[errors.AgentError], message: str) -> None:
        if self._failure is not None:
            return
        self._failure = (cls, message)
        for calls in self._calls.values():
            calls.put_nowait(_CLOSED)


class _Output:
    """Collects an exec's output and passes each chunk to the caller's callbacks."""

    def __init__(self, on_stdout: OutputCallback | None, on_stderr: OutputCallback | None):
        self._stdout, self._stderr = bytearray(), bytearray()
        self._callbacks = {protocol.Kind.STDOUT: on_stdout, protocol.Kind.STDERR: on_stderr}

    async def feed(self, frame: protocol.Frame) -> None:
        if frame.kind is protocol.Kind.STDOUT:
            self._stdout += frame.payload
        elif frame.kind is protocol.Kind.STDERR:
            self._stderr += frame.payload
        else:
            return
        callback = self._callbacks[frame.kind]
        if callback is not None:
            outcome = callback(frame.payload)
            if inspect.isawaitable(outcome):
                await outcome

    def result(self, answer: dict[str, Any]) -> ExecResult:
        try:
            return ExecResult(
                exit_code=int(answer["exit_code"]),
                stdout=bytes(self._stdout),
                stderr=bytes(self._stderr),
                duration_ms=float(answer["duration_ms"]),
                timed_out=bool(answer.get("timed_out", False)),
                output_truncated=bool(answer.get("output_truncated", False)),
                signal=None if answer.get("signal") is None else int(answer["signal"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise errors.ProtocolError(f"malformed exec answer {answer!r}") from exc


def _checked(reply: dict[str, Any]) -> dict[str, Any]:
    """The answer of a successful request; an error answer raised as our exception."""
    if reply.get("ok") is True:
        return reply
    error = reply.get("error")
    if not isinstance(error, dict):
        raise errors.ProtocolError(f"malformed agent answer {reply!r}")
    kind, message = str(error.get("type")), str(error.get("message"))
    if kind == "InvalidRequest":
        raise errors.InvalidRequest(message)
    raise errors.AgentRequestFailed(f"{kind}: {message}", type=kind)


def _hello_info(answer: dict[str, Any]) -> HelloInfo:
    try:
        return HelloInfo(
            protocol=int(answer["protocol"]),
            agent_version=str(answer["agent_version"]),
            boot_time=float(answer["boot_time"]),
            kernel=str(answer["kernel"]),
            warnings=tuple(str(w) for w in answer.get("warnings") or ()),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise errors.ProtocolError(f"malformed hello answer {answer!r}") from exc
