"""The host's end of the agent stream: frames routed by request id, with flow control.

:class:`AgentLink` owns the ``(StreamReader, StreamWriter)`` pair a VMM driver gives
back. A reader task routes each frame to the call of its rid, so any number of
requests share the one stream. Bulk data is flow controlled per request (see
docs/protocol.md): an upload keeps at most ``WINDOW`` unacknowledged bytes in flight,
a download acknowledges what its consumer took. A call left without its answer
(cancelled, or its consumer stopped reading) tells the agent to cancel it.

Memory stays bounded whatever the agent does: every call acknowledges the data its
consumer took (so a stalled consumer stalls the producer in the guest), and an
:class:`_Inbox` holds what the agent may still send a call: ``WINDOW`` (+ slack) of
unacknowledged data, ``CONTROL_BUDGET`` of JSON frames, and for an ``exec`` its output
cap in all. A frame past those budgets is a protocol violation: the link fails with
:class:`~emberbox.errors.ProtocolError` (the service then ends that sandbox), whatever
the agent claims. Frames for rids that have no open call are dropped as they come.

Foreign errors are translated here, at the boundary: a closed stream is
:class:`~emberbox.errors.AgentDisconnected`, bytes that are not frames are
:class:`~emberbox.errors.ProtocolError`, error answers become the matching class.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any

from emberbox import errors
from emberbox.guest import protocol

READ_SIZE = 64 * 1024
Kind = protocol.Kind
ERROR_TYPES: dict[str, type[errors.EmberboxError]] = {
    "InvalidRequest": errors.InvalidRequest,
    "NotFound": errors.NotFound,
    "Conflict": errors.Conflict,
}


class _Failed:
    """Queued to a call when its upload failed on our side."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_CLOSED = object()  # queued to every pending call when the channel fails
Item = protocol.Frame | _Failed | object

DATA_BUDGET = protocol.WINDOW + protocol.WINDOW_SLACK  # unacknowledged data per call
CONTROL_BUDGET = 2 * protocol.MAX_PAYLOAD  # JSON frames (answer, events) waiting per call
FRAME_COST = 128  # what a queued frame costs beyond its payload (an empty one is not free)


class _Inbox:
    """The frames waiting for one call, within the budgets the agent must keep."""

    def __init__(self, data_limit: int | None = None) -> None:
        self.frames: asyncio.Queue[Item] = asyncio.Queue()
        self.data_limit = data_limit  # data bytes the call takes in all (None: no cap)
        self.received = 0  # data bytes received
        self.acked = 0  # data bytes acknowledged to the agent
        self.control = 0  # bytes of JSON frames waiting

    def put(self, frame: protocol.Frame) -> str | None:
        """Queues `frame`; the budget it breaks (then it is not queued), if any."""
        if frame.kind in protocol.JSON_KINDS:
            self.control += len(frame.payload) + FRAME_COST
            if self.control > CONTROL_BUDGET:
                return f"request {frame.rid}: over {CONTROL_BUDGET} bytes of answers waiting"
        else:
            self.received += len(frame.payload)
            if self.received - self.acked > DATA_BUDGET:
                unacked = self.received - self.acked
                return f"request {frame.rid}: {unacked} unacknowledged bytes, window {DATA_BUDGET}"
            if self.data_limit is not None and self.received > self.data_limit:
                cap = self.data_limit
                return f"request {frame.rid}: {self.received} bytes of output, cap {cap}"
        self.frames.put_nowait(frame)
        return None

    async def get(self) -> Item:
        item = await self.frames.get()
        if isinstance(item, protocol.Frame) and item.kind in protocol.JSON_KINDS:
            self.control -= len(item.payload) + FRAME_COST
        return item

    def clear(self) -> None:
        while not self.frames.empty():
            self.frames.get_nowait()
        self.received = self.acked = self.control = 0

    @property
    def pending(self) -> int:
        """Bytes this call holds or may be sent before its consumer acknowledges more."""
        return self.received - self.acked + self.control


class HostCall:
    """One request's frames, in order; `answered` once its RESPONSE came. The data its
    consumer took is acknowledged (:meth:`took`), so that the agent sends more."""

    def __init__(self, link: AgentLink, rid: int, inbox: _Inbox) -> None:
        self.rid = rid
        self.inbox = inbox
        self.answered = False
        self._link = link
        self._taken = 0

    @property
    def frames(self) -> asyncio.Queue[Item]:
        return self.inbox.frames

    async def next(self) -> protocol.Frame:
        item = await self.inbox.get()
        if isinstance(item, protocol.Frame):
            self.answered = item.kind is Kind.RESPONSE
            return item
        if isinstance(item, _Failed):
            raise item.exc
        self._link.raise_if_failed()
        raise errors.AgentDisconnected("agent channel closed")  # not reached: failed

    async def took(self, size: int) -> None:
        """The consumer is done with `size` more bytes: acknowledge every ACK_EVERY."""
        self._taken += size
        if self._taken - self.inbox.acked >= protocol.ACK_EVERY:
            self.inbox.acked = self._taken
            ack = {"event": "ack", "bytes": self._taken}
            await self._link.send(protocol.encode_json(Kind.EVENT, self.rid, ack))

    async def response(
        self, on_data: Callable[[protocol.Frame], Awaitable[None]]
    ) -> dict[str, Any]:
        """Waits for the RESPONSE, passing other frames to `on_data` (and acknowledging
        data frames once `on_data` returns)."""
        while True:
            frame = await self.next()
            if frame.kind is Kind.RESPONSE:
                return frame.json()
            await on_data(frame)
            if frame.kind not in protocol.JSON_KINDS:
                await self.took(len(frame.payload))


class AgentLink:
    """Frames to and from the agent over one stream. Create it inside a running loop."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._calls: dict[int, _Inbox] = {}
        self._write_lock = asyncio.Lock()
        self._failure: tuple[type[errors.AgentError], str] | None = None
        self.ready = asyncio.Event()  # set by the agent's "ready" event
        self._task = asyncio.get_running_loop().create_task(self._read_loop())

    @property
    def closed(self) -> bool:
        return self._failure is not None

    @property
    def violation(self) -> str | None:
        """Why the agent was cut off, if it broke the protocol (else None)."""
        if self._failure is not None and self._failure[0] is errors.ProtocolError:
            return self._failure[1]
        return None

    async def aclose(self) -> None:
        """Close the stream; pending requests raise AgentDisconnected. Idempotent."""
        self._fail(errors.AgentDisconnected, "agent channel closed")
        if not self._task.done():
            self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._writer.close()
        with contextlib.suppress(OSError, RuntimeError):  # the peer may be gone already
            await self._writer.wait_closed()

    @property
    def pending_bytes(self) -> int:
        """What the open calls hold or may be sent before they acknowledge more."""
        return sum(inbox.pending for inbox in set(self._calls.values()))

    @contextlib.asynccontextmanager
    async def open(self, data_limit: int | None = None) -> AsyncIterator[HostCall]:
        """A call with a fresh rid, taking at most `data_limit` data bytes in all;
        leaving it unanswered asks the agent to cancel it."""
        self.raise_if_failed()
        call = HostCall(self, next(self._ids), _Inbox(data_limit))
        self._calls[call.rid] = call.inbox
        try:
            yield call
        finally:
            self._calls.pop(call.rid, None)
            if not call.answered:
                self.send_nowait(protocol.encode_json(Kind.EVENT, call.rid, {"event": "cancel"}))

    async def request(
        self,
        body: dict[str, Any],
        on_data: Callable[[protocol.Frame], Awaitable[None]] | None = None,
        data_limit: int | None = None,
    ) -> dict[str, Any]:
        """Sends one request; its answer (checked), data frames passed to `on_data`
        (at most `data_limit` bytes of them: more breaks the protocol)."""
        async with self.open(data_limit) as call:
            await self.send(protocol.encode_json(Kind.REQUEST, call.rid, body))
            return checked(await call.response(on_data or _ignore))

    async def upload(
        self, body: dict[str, Any], data: bytes | AsyncIterable[bytes]
    ) -> dict[str, Any]:
        """A request followed by `data` as STDIN frames and the end marker."""
        async with self.open() as call:
            await self.send(protocol.encode_json(Kind.REQUEST, call.rid, body))
            window = _Window()
            feeder = asyncio.create_task(self._feed(call, data, window))
            try:
                return checked(await call.response(window.on_frame))
            finally:
                feeder.cancel()
                await asyncio.gather(feeder, return_exceptions=True)

    async def download(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        """A request whose STDOUT frames are yielded, acknowledged as they are taken."""
        async with self.open() as call:
            await self.send(protocol.encode_json(Kind.REQUEST, call.rid, body))
            while True:
                frame = await call.next()
                if frame.kind is Kind.RESPONSE:
                    checked(frame.json())
                    return
                if frame.kind is Kind.STDOUT:
                    yield frame.payload
                if frame.kind not in protocol.JSON_KINDS:
                    await call.took(len(frame.payload))

    async def first_answer(
        self, make_body: Callable[[], dict[str, Any]], timeout_s: float, resend_s: float
    ) -> dict[str, Any] | None:
        """Sends a request again, with a new rid, every `resend_s` until one is answered;
        the first answer (unchecked), or None after `timeout_s`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        answers = _Inbox()
        rids: list[int] = []  # all share one inbox: the first answer to any of them wins
        try:
            while (left := deadline - loop.time()) > 0:
                self.raise_if_failed()
                rid = next(self._ids)
                rids.append(rid)
                self._calls[rid] = answers
                await self.send(protocol.encode_json(Kind.REQUEST, rid, make_body()))
                reply = await self._next_response(answers, min(resend_s, left))
                if reply is not None:
                    return reply
        finally:
            for rid in rids:  # later answers find no call and are dropped
                self._calls.pop(rid, None)
        return None

    async def send(self, data: bytes) -> None:
        async with self._write_lock:
            self.raise_if_failed()
            try:
                self._writer.write(data)
                await self._writer.drain()
            except (ConnectionError, OSError) as exc:
                self._fail(errors.AgentDisconnected, "agent channel closed")
                raise errors.AgentDisconnected(f"agent channel closed: {exc}") from exc

    def send_nowait(self, data: bytes) -> None:
        """A small frame without waiting (from cleanup code); whole frames never mix."""
        if self._failure is None and not self._writer.is_closing():
            self._writer.write(data)

    def raise_if_failed(self) -> None:
        if self._failure is not None:
            cls, message = self._failure
            raise cls(message)  # a fresh instance per caller: tracebacks are per raise

    async def _feed(
        self, call: HostCall, data: bytes | AsyncIterable[bytes], window: _Window
    ) -> None:
        try:
            async for chunk in _chunks(data):
                for i in range(0, len(chunk), protocol.DATA_CHUNK):
                    piece = chunk[i : i + protocol.DATA_CHUNK]
                    await window.room(len(piece))
                    await self.send(protocol.encode(Kind.STDIN, call.rid, piece))
            await self.send(protocol.encode(Kind.STDIN, call.rid, b""))
        except Exception as exc:  # the caller's data failed, or the channel did
            call.frames.put_nowait(_Failed(exc))

    async def _next_response(self, answers: _Inbox, wait_s: float) -> dict[str, Any] | None:
        try:
            async with asyncio.timeout(wait_s):
                while True:
                    item = await answers.get()
                    if not isinstance(item, protocol.Frame):
                        self.raise_if_failed()
                    elif item.kind is Kind.RESPONSE:
                        return item.json()
        except TimeoutError:
            return None

    async def _read_loop(self) -> None:
        decoder = protocol.FrameDecoder()
        try:
            while data := await self._reader.read(READ_SIZE):
                for frame in decoder.feed(data):
                    self._route(frame)
        except protocol.ProtocolViolation as exc:
            self._fail(errors.ProtocolError, f"agent broke the protocol: {exc}")
            self._writer.close()
        except (ConnectionError, OSError):
            pass
        finally:  # whatever ended the loop, no answer can come any more
            self._fail(errors.AgentDisconnected, "agent channel closed")

    def _route(self, frame: protocol.Frame) -> None:
        if frame.rid == 0 and frame.kind is Kind.EVENT:
            if frame.json().get("event") == "ready":
                self.ready.set()
            return
        inbox = self._calls.get(frame.rid)
        if inbox is None:  # a late answer to a request given up on: dropped
            return
        broken = inbox.put(frame)
        if broken is not None:
            raise protocol.ProtocolViolation(broken)

    def _fail(self, cls: type[errors.AgentError], message: str) -> None:
        if self._failure is not None:
            return
        self._failure = (cls, message)
        for inbox in self._calls.values():
            if cls is errors.ProtocolError:  # what a hostile agent queued is dropped at once
                inbox.clear()
            inbox.frames.put_nowait(_CLOSED)


class _Window:
    """An upload's bytes in flight: the agent acknowledges them with "ack" events."""

    def __init__(self) -> None:
        self._sent = self._acked = 0
        self._moved = asyncio.Event()

    async def room(self, size: int) -> None:
        while self._sent - self._acked >= protocol.WINDOW:
            self._moved.clear()
            await self._moved.wait()
        self._sent += size

    async def on_frame(self, frame: protocol.Frame) -> None:
        if frame.kind is Kind.EVENT:
            event = frame.json()
            if event.get("event") == "ack" and isinstance(event.get("bytes"), int):
                self._acked = max(self._acked, event["bytes"])
                self._moved.set()


async def _chunks(data: bytes | AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    if isinstance(data, bytes | bytearray | memoryview):
        yield bytes(data)
    else:
        async for chunk in data:
            yield chunk


async def _ignore(frame: protocol.Frame) -> None:
    return None


def checked(reply: dict[str, Any]) -> dict[str, Any]:
    """The answer of a successful request; an error answer raised as our exception."""
    if reply.get("ok") is True:
        return reply
    error = reply.get("error")
    if not isinstance(error, dict):
        raise errors.ProtocolError(f"malformed agent answer {reply!r}")
    kind, message = str(error.get("type")), str(error.get("message"))
    cls = ERROR_TYPES.get(kind)
    if cls is not None:
        raise cls(message)
    raise errors.AgentRequestFailed(f"{kind}: {message}", type=kind)
