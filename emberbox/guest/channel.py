"""The agent's side of one byte stream to the host (standard library only).

:class:`Channel` owns the file descriptor (nonblocking reads on the loop, writes on a
thread), :class:`Session` serves it (decodes frames, runs one task per request) and
:class:`Call` is one request's conversation: its data frames out, the host's STDIN in,
flow control both ways (see docs/protocol.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import select
import threading
import traceback
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

from . import common, protocol

FLUSH_TIMEOUT_S = 5.0
BACKLOG_MAX_BYTES = 8 << 20  # producers pause while this much is unsent
CONGESTION_POLL_S = 0.02
READ_BATCH_BYTES = 1 << 20
INBOX_MAX_BYTES = 2 * protocol.WINDOW  # a host sending more ignores the window


class Channel:
    """One open byte stream to the host: nonblocking reads on the loop, writes on a thread.

    Writes go through a thread because a virtio-serial port refuses writes while no
    host is connected, and the loop must keep serving meanwhile. The channel owns `fd`
    and releases it with `closer`.
    """

    def __init__(self, fd: int, closer: Callable[[], None], name: str) -> None:
        self.name = name
        self._loop = asyncio.get_running_loop()
        self._fd, self._closer = fd, closer
        self.ended: asyncio.Future[str] = self._loop.create_future()
        self._queue: queue.SimpleQueue[bytes | asyncio.Future[None] | None] = queue.SimpleQueue()
        self._backlog, self._backlog_lock = 0, threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        self._reading = self._closed = False
        os.set_blocking(fd, False)
        self._thread = threading.Thread(target=self._write_loop, name=f"write-{name}", daemon=True)
        self._thread.start()

    def send(self, data: bytes) -> None:
        if self._closed:
            return
        with self._backlog_lock:
            self._backlog += len(data)
        self._queue.put(data)

    def congested(self) -> bool:
        return self._backlog > BACKLOG_MAX_BYTES

    async def flush(self) -> None:
        """Wait until everything sent so far is written (or FLUSH_TIMEOUT_S passed)."""
        if self._closed:
            return
        written: asyncio.Future[None] = self._loop.create_future()
        self._queue.put(written)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(written, FLUSH_TIMEOUT_S)

    def start_reading(self, on_data: Callable[[bytes], None]) -> None:
        self._loop.add_reader(self._fd, self._on_readable, on_data)
        self._reading = True

    def end(self, reason: str) -> None:
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False
        if not self.ended.done():
            self.ended.set_result(reason)

    def close(self) -> None:
        if self._closed:
            return
        self.end("closed")
        self._closed = True
        self._queue.put(None)
        os.write(self._wake_w, b"x")  # unblocks a writer waiting for the port
        self._thread.join(5.0)
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        with contextlib.suppress(OSError):
            self._closer()

    def _on_readable(self, on_data: Callable[[bytes], None]) -> None:
        # A virtio-serial read returns one 4 KiB buffer at most: drain what is there
        # in one go rather than one loop turn per buffer.
        chunks: list[bytes] = []
        ended = None
        while sum(map(len, chunks)) < READ_BATCH_BYTES:
            try:
                data = os.read(self._fd, 64 * 1024)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                ended = f"read failed: {exc}"
                break
            if not data:
                ended = "eof"
                break
            chunks.append(data)
        if chunks:
            on_data(b"".join(chunks))
        if ended is not None:
            self.end(ended)

    def _write_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            if isinstance(item, asyncio.Future):
                self._call_soon(partial(_resolve, item))
            elif not self._write_all(item):
                return
            else:
                with self._backlog_lock:
                    self._backlog -= len(item)

    def _write_all(self, data: bytes) -> bool:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._fd, view) :]
            except (BlockingIOError, InterruptedError):
                readable, _, _ = select.select([self._wake_r], [self._fd], [])
                if readable:  # closing
                    return False
            except OSError as exc:
                self._call_soon(partial(self.end, f"write failed: {exc}"))
                return False
        return True

    def _call_soon(self, callback: Callable[[], None]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            self._loop.call_soon_threadsafe(callback)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Call:
    """One request's conversation: data frames to the host, STDIN frames from it.

    Data is flow controlled both ways: :meth:`send` waits until the host has
    acknowledged all but ``WINDOW`` bytes and the channel is not congested (producers
    that cannot wait, a command's pipe readers, pause while :meth:`congested`, which
    counts the window too); :meth:`receive` acknowledges each STDIN chunk once the next
    is asked for, that is once the handler is done with it.
    """

    def __init__(self, rid: int, channel: Channel, takes_stdin: bool) -> None:
        self.rid = rid
        self.takes_stdin = takes_stdin
        self._channel = channel
        self._inbox: deque[bytes] = deque()
        self._inbox_bytes = 0
        self._stdin_ended = False
        self._arrived = asyncio.Event()
        self._received = self._acked_in = 0
        self._sent = self._acked_out = 0
        self._host_acked = asyncio.Event()

    def emit(self, kind: protocol.Kind, data: bytes) -> None:
        """Sends data frames at once (callers that can pause check `congested` first)."""
        self._sent += len(data)
        for chunk in protocol.encode_data(kind, self.rid, data):
            self._channel.send(chunk)

    def event(self, body: dict[str, Any]) -> None:
        """Sends an EVENT on this request (e.g. ``spawned``), ahead of its data and answer."""
        self._channel.send(protocol.encode_json(protocol.Kind.EVENT, self.rid, body))

    def congested(self) -> bool:
        """The channel is backed up, or the host has not acknowledged a window yet."""
        return self._channel.congested() or self._sent - self._acked_out >= protocol.WINDOW

    async def send(self, kind: protocol.Kind, data: bytes) -> None:
        """Sends data once there is room: channel not congested, the host's window open."""
        while True:
            if self._channel.congested():
                await asyncio.sleep(CONGESTION_POLL_S)
            elif self._sent - self._acked_out >= protocol.WINDOW:
                self._host_acked.clear()
                await self._host_acked.wait()
            else:
                break
        self.emit(kind, data)

    async def receive(self, batch_bytes: int = 0) -> bytes:
        """The next STDIN chunk, joined with those queued behind it up to `batch_bytes`
        in all; b"" once the host ended its data."""
        self._ack(self._received)
        while not self._inbox and not self._stdin_ended:
            self._arrived.clear()
            await self._arrived.wait()
        chunks: list[bytes] = []
        size = 0
        while self._inbox and (not chunks or size + len(self._inbox[0]) <= batch_bytes):
            chunks.append(self._inbox.popleft())
            size += len(chunks[-1])
        self._inbox_bytes -= size
        self._received += size
        return b"".join(chunks)

    def on_stdin(self, data: bytes) -> bool:
        """Queues a STDIN frame; False if the host overran its window."""
        if not self.takes_stdin or self._stdin_ended:
            return True  # dropped
        if data:
            self._inbox.append(data)
            self._inbox_bytes += len(data)
        else:
            self._stdin_ended = True
        self._arrived.set()
        return self._inbox_bytes <= INBOX_MAX_BYTES

    def on_ack(self, total: int) -> None:
        if total > self._acked_out:
            self._acked_out = total
            self._host_acked.set()

    def _ack(self, total: int) -> None:
        if total - self._acked_in >= protocol.ACK_EVERY:
            self._acked_in = total
            ack = {"event": "ack", "bytes": total}
            self._channel.send(protocol.encode_json(protocol.Kind.EVENT, self.rid, ack))


class Handler(Protocol):
    """What a session serves: the agent."""

    stdin_ops: frozenset[protocol.Op]

    async def handle(self, req: dict[str, Any], call: Call) -> dict[str, Any]: ...

    def shutdown(self) -> None: ...


class Session:
    """Serves one open channel until the peer disconnects or breaks the protocol."""

    def __init__(self, channel: Channel, handler: Handler, ready: dict[str, Any]) -> None:
        self._channel = channel
        self._handler = handler
        self._ready = ready
        self._decoder = protocol.FrameDecoder()
        self._calls: dict[int, tuple[Call, asyncio.Task[None]]] = {}

    async def run(self) -> str:
        """Returns why the session ended ("eof", "protocol violation: ...", ...)."""
        self._channel.send(protocol.encode_json(protocol.Kind.EVENT, 0, self._ready))
        self._channel.start_reading(self._on_data)
        try:
            return await self._channel.ended
        finally:  # requests of a lost connection cannot report anywhere: stop them
            tasks = [task for _, task in self._calls.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._channel.close()

    def _on_data(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except protocol.ProtocolViolation as exc:
            self._violation(str(exc))
            return
        for frame in frames:
            if frame.kind is protocol.Kind.REQUEST:
                self._start(frame)
                continue
            open_call = self._calls.get(frame.rid)
            if open_call is None:  # late frames of an ended request, or not for us
                continue
            call, task = open_call
            if frame.kind is protocol.Kind.STDIN and not call.on_stdin(frame.payload):
                self._violation(f"request {frame.rid} sent STDIN past its window")
                return
            if frame.kind is protocol.Kind.EVENT:
                event = frame.json()
                if event.get("event") == "cancel":
                    task.cancel()
                elif event.get("event") == "ack" and isinstance(event.get("bytes"), int):
                    call.on_ack(event["bytes"])

    def _start(self, frame: protocol.Frame) -> None:
        if frame.rid in self._calls:
            common.log(f"{self._channel.name}: request id {frame.rid} reused while open; dropped")
            return
        op = frame.json().get("op")
        call = Call(frame.rid, self._channel, takes_stdin=op in self._handler.stdin_ops)
        task = asyncio.get_running_loop().create_task(self._answer(frame, call))
        self._calls[frame.rid] = (call, task)
        task.add_done_callback(partial(self._forget, frame.rid))

    def _forget(self, rid: int, task: asyncio.Task[None]) -> None:
        if rid in self._calls and self._calls[rid][1] is task:
            del self._calls[rid]

    async def _answer(self, frame: protocol.Frame, call: Call) -> None:
        body = frame.json()
        try:
            reply = await self._handler.handle(body, call)
        except common.RequestError as exc:
            reply = protocol.error_payload(exc.kind, str(exc))
        except Exception as exc:  # a bug must not take the agent down
            common.log(f"request failed: {traceback.format_exc()}")
            reply = protocol.error_payload("AgentError", f"{type(exc).__name__}: {exc}")
        self._channel.send(protocol.encode_json(protocol.Kind.RESPONSE, frame.rid, reply))
        if body.get("op") == protocol.Op.SHUTDOWN and reply.get("ok"):
            await self._channel.flush()
            self._handler.shutdown()

    def _violation(self, reason: str) -> None:
        common.log(f"{self._channel.name}: protocol violation, dropping the connection: {reason}")
        self._channel.end(f"protocol violation: {reason}")
