"""The agent framing: encoding, incremental decoding and rejection of non-frames."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from emberbox.guest import protocol
from emberbox.guest.protocol import Frame, FrameDecoder, Kind, Op, ProtocolViolation

PROTOCOL_DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def test_round_trip_json_and_data() -> None:
    """A JSON frame and a data frame decode to what was encoded."""
    wire = protocol.encode_json(Kind.REQUEST, 7, {"op": "ping", "n": [1, 2]})
    wire += protocol.encode(Kind.STDOUT, 7, b"\x00\xffraw")
    frames = FrameDecoder().feed(wire)
    assert frames == [
        Frame(Kind.REQUEST, 7, b'{"op":"ping","n":[1,2]}'),
        Frame(Kind.STDOUT, 7, b"\x00\xffraw"),
    ]
    assert frames[0].json() == {"op": "ping", "n": [1, 2]}


def test_byte_by_byte_feeding() -> None:
    """Frames split into single bytes come out whole, each exactly when its last byte lands."""
    first = protocol.encode_json(Kind.RESPONSE, 3, {"ok": True})
    wire = first + protocol.encode(Kind.STDERR, 4, b"abc")
    decoder = FrameDecoder()
    frames: list[Frame] = []
    for i in range(len(wire)):
        frames += decoder.feed(wire[i : i + 1])
        expected = (i >= len(first) - 1) + (i == len(wire) - 1)
        assert len(frames) == expected, i
    assert [(f.kind, f.rid) for f in frames] == [(Kind.RESPONSE, 3), (Kind.STDERR, 4)]
    assert frames[1].payload == b"abc"
    assert decoder.pending == 0


def test_many_frames_in_one_chunk() -> None:
    """A single read holding many frames yields all of them in order."""
    wire = b"".join(protocol.encode(Kind.STDOUT, rid, str(rid).encode()) for rid in range(1, 101))
    frames = FrameDecoder().feed(wire)
    assert [f.rid for f in frames] == list(range(1, 101))
    assert [f.payload for f in frames] == [str(r).encode() for r in range(1, 101)]


def test_oversized_length_rejected_before_payload() -> None:
    """A header announcing more than the maximum fails at once, not after the payload."""
    header = protocol.HEADER.pack(protocol.MAGIC, Kind.STDOUT, 1, protocol.MAX_PAYLOAD + 1)
    with pytest.raises(ProtocolViolation, match="exceeds"):
        FrameDecoder().feed(header)


def test_encode_refuses_oversized_payload() -> None:
    """The encoder refuses to build a frame the peer would reject."""
    with pytest.raises(ProtocolViolation):
        protocol.encode(Kind.STDOUT, 1, b"x" * (protocol.MAX_PAYLOAD + 1))


@pytest.mark.parametrize("garbage", [b"GET / HTTP/1.1\r\n", b"E", b"EX", b"\x00"])
def test_bad_magic_rejected(garbage: bytes) -> None:
    """Bytes that do not start with the magic fail as soon as they show it."""
    decoder = FrameDecoder()
    if garbage == b"E":  # a prefix of the magic is not an error yet
        assert decoder.feed(garbage) == []
        garbage = b"Z"
    with pytest.raises(ProtocolViolation, match="magic"):
        decoder.feed(garbage)


def test_unknown_kind_rejected() -> None:
    """A frame kind outside the enum is a violation."""
    header = protocol.HEADER.pack(protocol.MAGIC, 99, 1, 0)
    with pytest.raises(ProtocolViolation, match="kind"):
        FrameDecoder().feed(header)


@pytest.mark.parametrize("payload", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_invalid_json_frame_rejected(payload: bytes) -> None:
    """A JSON kind whose payload is not a UTF-8 JSON object is a violation."""
    with pytest.raises(ProtocolViolation, match="JSON"):
        FrameDecoder().feed(protocol.encode(Kind.RESPONSE, 1, payload))


def test_data_frames_are_not_parsed_as_json() -> None:
    """STDOUT payloads are raw bytes, whatever they contain."""
    frames = FrameDecoder().feed(protocol.encode(Kind.STDOUT, 1, b"{not json"))
    assert frames[0].payload == b"{not json"


def test_decoder_stays_broken() -> None:
    """After a violation even valid frames are refused: the stream cannot resync."""
    decoder = FrameDecoder()
    with pytest.raises(ProtocolViolation):
        decoder.feed(b"garbage")
    with pytest.raises(ProtocolViolation):
        decoder.feed(protocol.encode_json(Kind.EVENT, 0, {"event": "ready"}))


def test_encode_data_chunking() -> None:
    """Data is split into frames of at most DATA_CHUNK bytes that reassemble exactly."""
    data = bytes(range(256)) * ((2 * protocol.DATA_CHUNK + 100) // 256 + 1)
    wires = protocol.encode_data(Kind.STDERR, 5, data)
    frames = FrameDecoder().feed(b"".join(wires))
    assert len(wires) == 3
    assert all(len(f.payload) <= protocol.DATA_CHUNK for f in frames)
    assert b"".join(f.payload for f in frames) == data
    assert protocol.encode_data(Kind.STDOUT, 5, b"") == []


def test_rid_out_of_range() -> None:
    """Request ids must fit in 32 bits."""
    with pytest.raises(ProtocolViolation):
        protocol.encode(Kind.REQUEST, 1 << 32, b"{}")


def test_error_payload_shape() -> None:
    """error_payload builds the failed-RESPONSE body both sides agree on."""
    assert protocol.error_payload("InvalidRequest", "bad") == {
        "ok": False,
        "error": {"type": "InvalidRequest", "message": "bad"},
    }


def test_empty_data_frame_is_the_end_marker() -> None:
    """A zero-length STDIN frame (end of input) survives encoding and decoding."""
    frames = FrameDecoder().feed(protocol.encode(Kind.STDIN, 9, b""))
    assert frames == [Frame(Kind.STDIN, 9, b"")]


def test_flow_control_constants() -> None:
    """Version 3; the window holds several acks' worth and many data frames, and its
    slack the chunks a command's two pipes may send past it at once."""
    assert protocol.PROTOCOL_VERSION == 3
    assert protocol.WINDOW >= 4 * protocol.ACK_EVERY >= 4 * protocol.DATA_CHUNK
    assert protocol.WINDOW_SLACK >= 2 * protocol.DATA_CHUNK


def documented_ops(markdown: str) -> list[str]:
    """The ops named in the first cell of each table row of the "## Ops" section."""
    section = markdown.split("\n## Ops\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [op for row in rows for op in re.findall(r"`(\w+)`", row.split("|")[1])]


def test_op_is_the_documented_set_of_ops() -> None:
    """Every op in docs/protocol.md's ops tables is an Op member, once, and every member
    is documented."""
    ops = documented_ops(PROTOCOL_DOC.read_text(encoding="utf-8"))
    assert len(ops) == len(set(ops)), ops
    assert set(ops) == {op.value for op in Op}


def test_documented_ops_reads_every_cell_of_a_row() -> None:
    """A row naming two ops yields both; rows of other sections are ignored."""
    doc = "# P\n## Ops\n| op | x |\n|---|---|\n| `ping`, `shutdown` | `{}` |\n## Host\n| `no` | |\n"
    assert documented_ops(doc) == ["ping", "shutdown"]
