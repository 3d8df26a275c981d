"""The framing spoken between the host and the guest agent (standard library only).

One byte stream (a virtio-serial port under QEMU, an AF_VSOCK connection under
Firecracker) carries frames::

    +------+------+-----------+-------------+-------------------+
    | 'E'  | 'B'  | kind (u8) | rid (u32be) | length (u32be)    |  payload (length bytes)
    +------+------+-----------+-------------+-------------------+

``rid`` is the request id the frame belongs to, so any number of requests run at once
over the one stream. JSON kinds carry one UTF-8 JSON object; data kinds carry raw bytes.

A conversation: the host sends ``REQUEST`` ``{"op": ...}`` with a fresh rid; the agent
may send ``EVENT``, ``STDOUT`` and ``STDERR`` frames for that rid and ends it with exactly
one ``RESPONSE`` (``{"ok": true, ...}`` or ``{"ok": false, "error": {...}}``); the host
may send ``STDIN`` frames (a zero-length one ends them) and ``EVENT`` frames (``ack``,
``cancel``) for it. See docs/protocol.md for the ops and the flow control. The agent
announces itself with an unsolicited ``EVENT`` ``{"event": "ready"}`` on rid 0 each time
it (re)opens its channel; the host then sends ``hello``.

Anything that is not a frame (bad magic, unknown kind, a length over ``MAX_PAYLOAD``,
invalid JSON) raises :class:`ProtocolViolation`: the stream cannot be resynchronised
and the peer must drop it.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass
from typing import Any

PROTOCOL_VERSION = 3
# What an agent offers beyond PROTOCOL_VERSION, listed in its hello answer ("features"),
# so that a newer host still drives an older agent (images built before a feature):
# FEATURE_USER: exec, spawn and run take "user" {uid, gid, name, no_new_privs} and the
# agent switches to it itself (guest/runas.py); without it the host wraps the command.
FEATURE_USER = "user"
# FEATURE_SPAWN_ATTACH: spawn takes "close_stdin" (a pipe closed at once) and "attach"
# (an EVENT {"event": "spawned", "pid"} first, then what attach sends and answers), so a
# command is started and followed in one request.
FEATURE_SPAWN_ATTACH = "spawn_attach"
FEATURES = (FEATURE_USER, FEATURE_SPAWN_ATTACH)
AGENT_PORT_NAME = "org.emberbox.agent"  # virtio-serial port name
AGENT_VSOCK_PORT = 1024
MAGIC = b"EB"
HEADER = struct.Struct(">2sBII")
MAX_PAYLOAD = 1 << 20
DATA_CHUNK = 64 * 1024
# Flow control of every data frame (the host's STDIN, the agent's STDOUT and STDERR):
# the sender keeps at most WINDOW unacknowledged bytes in flight on a request; the
# receiver acknowledges with EVENT {"event": "ack", "bytes": total} at least every
# ACK_EVERY bytes. A sender checks the window before each chunk, so it may overshoot by
# what it sends at once (a chunk from each of a command's two pipes): past
# WINDOW + WINDOW_SLACK the receiver treats the stream as hostile and drops it.
WINDOW = 4 << 20
ACK_EVERY = 256 * 1024
WINDOW_SLACK = 4 * DATA_CHUNK


class Kind(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    EVENT = 3
    STDOUT = 4
    STDERR = 5
    STDIN = 6


JSON_KINDS = frozenset({Kind.REQUEST, Kind.RESPONSE, Kind.EVENT})


class Op(enum.StrEnum):
    """Every request op the agent answers (docs/protocol.md, "Ops"); both sides use it."""

    HELLO = "hello"
    PING = "ping"
    SHUTDOWN = "shutdown"
    EXEC = "exec"
    SPAWN = "spawn"
    ATTACH = "attach"
    WRITE_STDIN = "write_stdin"
    SIGNAL = "signal"
    RESIZE = "resize"
    WAIT = "wait"
    PS = "ps"
    FORGET = "forget"
    STAT = "stat"
    LIST = "list"
    READ = "read"
    WRITE = "write"
    MKDIR = "mkdir"
    REMOVE = "remove"
    RENAME = "rename"
    TAR_OUT = "tar_out"
    TAR_IN = "tar_in"
    CONNECT = "connect"
    WARM = "warm"
    RUN = "run"


class ProtocolViolation(ValueError):
    """The bytes received are not a valid frame stream."""


@dataclass(frozen=True)
class Frame:
    kind: Kind
    rid: int
    payload: bytes

    def json(self) -> dict[str, Any]:
        """The payload of a JSON frame as a dict."""
        return decode_json(self.payload)


def decode_json(payload: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolViolation(f"frame payload is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ProtocolViolation("frame payload is JSON but not an object")
    return obj


def encode(kind: Kind, rid: int, payload: bytes) -> bytes:
    """One frame as bytes; raises ProtocolViolation for payloads over MAX_PAYLOAD."""
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolViolation(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    if not 0 <= rid <= 0xFFFFFFFF:
        raise ProtocolViolation(f"request id {rid} out of range")
    return HEADER.pack(MAGIC, int(kind), rid, len(payload)) + payload


def encode_json(kind: Kind, rid: int, obj: dict[str, Any]) -> bytes:
    return encode(kind, rid, json.dumps(obj, separators=(",", ":")).encode("utf-8"))


def encode_data(kind: Kind, rid: int, data: bytes) -> list[bytes]:
    """Data of any size as frames of at most DATA_CHUNK bytes each."""
    return [encode(kind, rid, data[i : i + DATA_CHUNK]) for i in range(0, len(data), DATA_CHUNK)]


class FrameDecoder:
    """Incremental decoder: feed it bytes as they arrive, get whole frames back.

    Partial headers and payloads are kept until the rest arrives. After a
    ProtocolViolation the decoder stays broken: every later feed raises again.
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self._buf = bytearray()
        self._max_payload = max_payload
        self._broken: ProtocolViolation | None = None

    def feed(self, data: bytes) -> list[Frame]:
        if self._broken is not None:
            raise self._broken
        self._buf += data
        frames: list[Frame] = []
        try:
            while True:
                frame = self._next()
                if frame is None:
                    return frames
                frames.append(frame)
        except ProtocolViolation as exc:
            self._broken = exc
            raise

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole frame."""
        return len(self._buf)

    def _next(self) -> Frame | None:
        buf = self._buf
        # Check the magic as soon as its bytes arrive, so garbage fails fast.
        if buf[:2] != MAGIC[: len(buf[:2])]:
            raise ProtocolViolation(f"bad frame magic {bytes(buf[:2])!r}")
        if len(buf) < HEADER.size:
            return None
        _, kind_value, rid, length = HEADER.unpack_from(buf)
        try:
            kind = Kind(kind_value)
        except ValueError:
            raise ProtocolViolation(f"unknown frame kind {kind_value}") from None
        if length > self._max_payload:
            raise ProtocolViolation(f"frame of {length} bytes exceeds {self._max_payload}")
        end = HEADER.size + length
        if len(buf) < end:
            return None
        payload = bytes(buf[HEADER.size : end])
        del buf[:end]
        if kind in JSON_KINDS:
            decode_json(payload)  # validate now; a bad JSON frame poisons the stream
        return Frame(kind, rid, payload)


def error_payload(kind: str, message: str) -> dict[str, Any]:
    """The RESPONSE body of a failed request."""
    return {"ok": False, "error": {"type": kind, "message": message}}
