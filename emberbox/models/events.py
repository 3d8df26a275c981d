"""Streamed output (NDJSON, one event per line; the same events on the terminal's
WebSocket): chunks of stdout and stderr, then one ``exit`` or ``error`` event."""

from __future__ import annotations

import base64
from typing import Annotated, Literal

from pydantic import Field

from emberbox.models.common import PublicModel
from emberbox.models.errors import ErrorDetail


class OutputEvent(PublicModel):
    """A chunk of output. ``data`` is UTF-8 text; when the chunk's bytes are not valid
    UTF-8, ``data`` has them with U+FFFD replacements and ``data_b64`` has them exactly.
    (A character split between chunks is never split between events.)"""

    type: Literal["stdout", "stderr"]
    data: str
    data_b64: str | None = Field(default=None, description="The exact bytes (base64).")

    @classmethod
    def from_bytes(cls, stream: Literal["stdout", "stderr"], chunk: bytes) -> OutputEvent:
        try:
            return cls(type=stream, data=chunk.decode("utf-8"))
        except UnicodeDecodeError:
            text = chunk.decode("utf-8", errors="replace")
            return cls(type=stream, data=text, data_b64=base64.b64encode(chunk).decode("ascii"))

    def raw(self) -> bytes:
        """The chunk's bytes as the command wrote them."""
        if self.data_b64 is not None:
            return base64.b64decode(self.data_b64)
        return self.data.encode("utf-8")


class ExitEvent(PublicModel):
    """The last event of a stream: how the command or process ended."""

    type: Literal["exit"] = "exit"
    exit_code: int | None = Field(description="null when a signal ended it (see `signal`).")
    signal: int | None = None
    duration_ms: float | None = None
    timed_out: bool = False
    output_truncated: bool = False
    memory_limited: bool = False


class ErrorEvent(PublicModel):
    """The last event of a stream that failed after it began (the HTTP status was 200)."""

    type: Literal["error"] = "error"
    error: ErrorDetail


StreamEvent = Annotated[OutputEvent | ExitEvent | ErrorEvent, Field(discriminator="type")]
