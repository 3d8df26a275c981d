"""Streamed exec: NDJSON events, refusals as status codes, and output events that never
split a character."""

from __future__ import annotations

import base64

import httpx
import pytest

from emberbox import errors
from emberbox.api.streams import OutputEvents, split_utf8
from emberbox.models import OutputEvent
from tests.support.api_calls import error_message, ndjson_events, new_sandbox
from tests.support.fakes_manager import FakeManager

pytestmark = pytest.mark.anyio


async def test_exec_stream_answers_ndjson_events(client: httpx.AsyncClient) -> None:
    """ "stream": true answers one event per line: output (invalid UTF-8 also as base64),
    then the exit event."""
    sandbox_id = await new_sandbox(client)
    body = {"cmd": "echo hi", "stream": True}
    events = ndjson_events(await client.post(f"/v1/sandboxes/{sandbox_id}/exec", json=body))
    assert events[0] == {"type": "stdout", "data": f"ran echo hi in {sandbox_id}\n"}
    assert events[1] == {"type": "stderr", "data": "err\ufffd\n", "data_b64": "ZXJy/wo="}
    assert base64.b64decode(events[1]["data_b64"]) == b"err\xff\n"
    exit_event = events[-1]
    assert exit_event["type"] == "exit"
    assert (exit_event["exit_code"], exit_event["timed_out"]) == (0, False)
    assert exit_event["duration_ms"] == 1.5


async def test_exec_stream_refusals_are_status_codes(
    client: httpx.AsyncClient, manager: FakeManager
) -> None:
    """404, 409 and 422 come as status codes before any event; a failure after the stream
    began is its last event, with the error's class."""
    sandbox_id = await new_sandbox(client)
    stream = {"cmd": "true", "stream": True}
    error_message(await client.post("/v1/sandboxes/nope/exec", json=stream), 404, "NotFound")
    body = {"cmd": "true", "stream": "yes please"}
    error_message(
        await client.post(f"/v1/sandboxes/{sandbox_id}/exec", json=body), 422, "ValidationError"
    )
    manager.raise_on_exec = errors.VMMCrashed("qemu died", console_tail="panic")
    events = ndjson_events(await client.post(f"/v1/sandboxes/{sandbox_id}/exec", json=stream))
    assert events == [
        {
            "type": "error",
            "error": {"type": "VMMCrashed", "message": "qemu died", "console_tail": "panic"},
        }
    ]
    await client.delete(f"/v1/sandboxes/{sandbox_id}")
    error_message(
        await client.post(f"/v1/sandboxes/{sandbox_id}/exec", json=stream), 409, "Conflict"
    )


def test_split_utf8_keeps_characters_whole() -> None:
    """A chunk ending inside a multi-byte character holds those bytes back."""
    euro = "€".encode()  # three bytes
    assert split_utf8(b"ab" + euro[:1]) == (b"ab", euro[:1])
    assert split_utf8(b"ab" + euro[:2]) == (b"ab", euro[:2])
    assert split_utf8(b"ab" + euro) == (b"ab" + euro, b"")
    assert split_utf8(b"\xff") == (b"\xff", b"")
    assert split_utf8("😀".encode()[:3]) == (b"", "😀".encode()[:3])


async def test_output_events_never_split_a_character() -> None:
    """Chunks cut mid-character become events of whole characters, without base64."""
    lines: list[bytes] = []

    async def write(data: bytes) -> None:
        lines.append(data)

    events = OutputEvents(write)
    data = "héllo €uro".encode()
    for i in range(len(data)):
        await events.stdout(data[i : i + 1])
    await events.stderr(b"\xe2\x82")  # a truncated character at the very end
    await events.flush()
    decoded = [OutputEvent.model_validate_json(line) for line in lines]
    stdout = [e for e in decoded if e.type == "stdout"]
    assert "".join(e.data for e in stdout) == "héllo €uro"
    assert all(e.data_b64 is None for e in stdout)
    assert decoded[-1].raw() == b"\xe2\x82"
    assert decoded[-1].data_b64 is not None
