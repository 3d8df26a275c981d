"""The E2B front's pure parts: the Connect envelope codec, the list query (E2B's
triple-encoded metadata filter, states, paging), users and the reserved metadata."""

from __future__ import annotations

import base64
import urllib.parse
from pathlib import Path

import pytest

from emberbox import errors
from emberbox.e2b import envelope, query, users
from emberbox.e2b.front import CODE_STATUS, CONNECT_CODES
from emberbox.images import rootfs


def test_envelope_layout() -> None:
    """A message is flags, a big-endian u32 length and the compact JSON."""
    data = envelope.encode({"start": {}})
    assert data[:5] == b"\x00\x00\x00\x00\x0c" and data[5:] == b'{"start":{}}'
    assert envelope.end_stream() == b"\x02\x00\x00\x00\x02{}"
    closing = envelope.end_stream(("not_found", "gone"))
    assert closing[0] == 2 and b'"code":"not_found"' in closing


def test_decoder_takes_bytes_as_they_come() -> None:
    """Envelopes split anywhere come out whole, in order."""
    stream = envelope.encode({"a": 1}) + envelope.encode({"b": 2}) + envelope.end_stream()
    decoder = envelope.EnvelopeDecoder()
    out = [e for byte in stream for e in decoder.feed(bytes([byte]))]
    assert [e.message for e in out] == [{"a": 1}, {"b": 2}, {}]
    assert [e.end for e in out] == [False, False, True] and decoder.pending == 0


@pytest.mark.parametrize(
    "bad",
    [
        b"\x01\x00\x00\x00\x02{}",  # compressed
        b"\x04\x00\x00\x00\x02{}",  # unknown flag
        b"\x00\x00\x00\x00\x02[]",  # not an object
        b"\x00\x00\x00\x00\x02{x",  # not JSON
        b"\x00\xff\xff\xff\xff",  # too long
    ],
)
def test_a_bad_envelope_breaks_the_decoder(bad: bytes) -> None:
    """A malformed envelope raises, and so does every later feed."""
    decoder = envelope.EnvelopeDecoder()
    with pytest.raises(envelope.EnvelopeError):
        decoder.feed(bad)
    with pytest.raises(envelope.EnvelopeError):
        decoder.feed(envelope.encode({}))


def test_decode_one_wants_exactly_one_message() -> None:
    """A stream's request body is one message envelope, nothing more."""
    assert envelope.decode_one(envelope.encode({"x": 1})) == {"x": 1}
    for body in (b"", envelope.encode({}) * 2, envelope.end_stream(), envelope.encode({})[:-1]):
        with pytest.raises(envelope.EnvelopeError):
            envelope.decode_one(body)


def test_metadata_filter_is_decoded_three_times() -> None:
    """The SDK's triple encoding: PROTOCOL.md's example, through a real query string."""
    raw = "metadata=a%252520b%3Dc%252526d%26x%3Dy"
    value = dict(urllib.parse.parse_qsl(raw))["metadata"]
    assert query.decode_metadata_filter(value) == {"a b": "c&d", "x": "y"}
    assert query.decode_metadata_filter("") == {}


def test_states_limits_times_and_pages() -> None:
    """State lists, limits, RFC 3339 times and the paging token."""
    assert query.parse_states(None) == {"running", "paused"}
    assert query.parse_states("paused") == {"paused"}
    with pytest.raises(query.QueryError):
        query.parse_states("stopped")
    with pytest.raises(query.QueryError):
        query.parse_limit("0")
    assert query.parse_time("2026-01-02T03:04:05Z").utcoffset() is not None
    with pytest.raises(query.QueryError):
        query.parse_time("2026-01-02T03:04:05")
    items = list(range(5))
    first, token = query.page(items, None, 2)
    second, token2 = query.page(items, token, 2)
    last, token3 = query.page(items, token2, 2)
    assert (first, second, last, token3) == ([0, 1], [2, 3], [4], None)
    with pytest.raises(query.QueryError):
        query.page(items, "garbage!", 2)


def test_reserved_metadata_never_shows() -> None:
    """The E2B data round-trips through metadata and is hidden from callers."""
    data = query.E2bData("tok", "client", "base")
    metadata = {"k": "v", query.RESERVED_KEY: data.encode()}
    assert query.E2bData.decode(metadata) == data
    assert query.public_metadata(metadata) == {"k": "v"}
    assert query.E2bData.decode({"k": "v"}) is None
    assert query.E2bData.decode({query.RESERVED_KEY: "{bad"}) is None


def test_users() -> None:
    """user by default, root on request; setpriv wraps user's commands; paths resolve."""
    root = base64.b64encode(b"root:").decode()
    assert users.from_authorization(f"Basic {root}").name == "root"
    assert users.from_authorization(None) is users.DEFAULT_USER
    with pytest.raises(errors.InvalidRequest):
        users.named("mallory")
    user = users.DEFAULT_USER
    assert user.wrap(["id"])[0] == "setpriv" and users.USERS["root"].wrap(["id"]) == ["id"]
    assert user.resolve("a/../b") == "/home/user/b" and user.resolve("/etc") == "/etc"
    assert user.resolve(None) == "/home/user"


def test_connect_codes_round_trip() -> None:
    """Each Connect code we send maps back to the status PROTOCOL.md gives it."""
    for status in (400, 401, 404, 409, 429, 500, 503, 504):
        assert CODE_STATUS[CONNECT_CODES[status]] == status


def test_the_user_account_is_added_to_a_root_tree(tmp_path: Path) -> None:
    """The rootfs gets user (1000) in passwd, group and shadow, sudoers and a home; twice
    is the same as once."""
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (etc / "group").write_text("root:x:0:")  # no final newline
    for _ in range(2):
        rootfs.add_user(tmp_path)
    assert (etc / "passwd").read_text().count("user:x:1000:1000::/home/user:/bin/bash") == 1
    assert (etc / "group").read_text() == "root:x:0:\nuser:x:1000:\n"
    assert "NOPASSWD" in (etc / "sudoers.d" / "user").read_text()
    assert oct((etc / "sudoers.d" / "user").stat().st_mode & 0o777) == "0o440"
    assert (tmp_path / "home" / "user").is_dir()
