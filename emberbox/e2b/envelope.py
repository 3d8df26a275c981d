"""The Connect protocol's stream envelope (standard library only, no I/O).

A server-streaming Connect call (``application/connect+json``) sends its request and
its answers as envelopes::

    +--------+------------------------+--------------------------+
    | flags  | length (u32, big end.) | payload: `length` bytes  |
    | 1 byte | 4 bytes                | UTF-8 JSON               |
    +--------+------------------------+--------------------------+
      0x00  a message
      0x01  compressed (never used by the E2B SDK; refused here)
      0x02  end of stream: ``{}`` or ``{"error": {"code": ..., "message": ...}}``

    00 00 00 00 0b 7b 22 73 74 61 72 74 22 3a 7b 7d 7d    {"start":{}}

:class:`EnvelopeDecoder` takes bytes as they come and yields whole envelopes; a bad
envelope (compressed, unknown flags, too long, not JSON) raises :class:`EnvelopeError`
and breaks the decoder for good, as ``emberbox/guest/protocol.py`` does with frames.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

MESSAGE = 0x00
COMPRESSED = 0x01
END_STREAM = 0x02
HEADER = struct.Struct(">BI")
MAX_PAYLOAD = 16 * 1024 * 1024  # one request envelope; the SDK's are small


class EnvelopeError(ValueError):
    """A malformed envelope; the stream it came from is unusable."""


@dataclass(frozen=True)
class Envelope:
    flags: int
    message: dict[str, Any]

    @property
    def end(self) -> bool:
        return bool(self.flags & END_STREAM)


def encode(message: dict[str, Any], *, flags: int = MESSAGE) -> bytes:
    """One envelope of ``message`` as compact JSON."""
    payload = json.dumps(message, separators=(",", ":")).encode()
    return HEADER.pack(flags, len(payload)) + payload


def end_stream(error: tuple[str, str] | None = None) -> bytes:
    """The closing envelope: ``{}``, or the ``(code, message)`` error."""
    body: dict[str, Any] = {}
    if error is not None:
        body["error"] = {"code": error[0], "message": error[1]}
    return encode(body, flags=END_STREAM)


class EnvelopeDecoder:
    """Bytes in, envelopes out; see the module docstring."""

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self._buffer = bytearray()
        self._max = max_payload
        self._broken: EnvelopeError | None = None

    def feed(self, data: bytes) -> list[Envelope]:
        if self._broken is not None:
            raise self._broken
        self._buffer += data
        out: list[Envelope] = []
        try:
            while len(self._buffer) >= HEADER.size:
                flags, length = HEADER.unpack_from(self._buffer)
                self._check(flags, length)
                if len(self._buffer) < HEADER.size + length:
                    break
                payload = bytes(self._buffer[HEADER.size : HEADER.size + length])
                del self._buffer[: HEADER.size + length]
                out.append(Envelope(flags, _json_object(payload)))
        except EnvelopeError as exc:
            self._broken = exc
            raise
        return out

    def _check(self, flags: int, length: int) -> None:
        if flags & COMPRESSED:
            raise EnvelopeError("compressed envelopes are not supported")
        if flags & ~END_STREAM:
            raise EnvelopeError(f"unknown envelope flags 0x{flags:02x}")
        if length > self._max:
            raise EnvelopeError(f"envelope of {length} bytes is over {self._max}")

    @property
    def pending(self) -> int:
        """Bytes held that do not yet make a whole envelope."""
        return len(self._buffer)


def decode_one(data: bytes) -> dict[str, Any]:
    """The message of a body that must be exactly one envelope (a stream's request)."""
    decoder = EnvelopeDecoder()
    envelopes = decoder.feed(data)
    if len(envelopes) != 1 or decoder.pending or envelopes[0].end:
        raise EnvelopeError("the request must be exactly one message envelope")
    return envelopes[0].message


def _json_object(payload: bytes) -> dict[str, Any]:
    try:
        value = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise EnvelopeError(f"envelope payload is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise EnvelopeError("envelope payload must be a JSON object")
    return value
