"""The E2B front's pure parts: the Connect envelope codec, the list query (E2B's
triple-encoded metadata filter, states, paging), users and the reserved metadata."""

from __future__ import annotations

import base64
import os
import subprocess
import urllib.parse
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
from starlette.requests import Request

from emberbox import errors
from emberbox.agent_client.spec import RunAs
from emberbox.config import Settings
from emberbox.e2b import envd, envelope, processes, query, users
from emberbox.e2b.front import CODE_STATUS, CONNECT_CODES, Front, envd_call, retry_after
from emberbox.images import rootfs
from emberbox.service.sandboxes.manager import SandboxManager, SandboxRecord
from emberbox.service.sandboxes.state import SandboxState
from emberbox.service.tenancy.access import Tenancy


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
    """user by default, root on request; user's commands carry uid 1000 with user's
    groups (root's none: the agent's own user); paths resolve."""
    root = base64.b64encode(b"root:").decode()
    assert users.from_authorization(f"Basic {root}").name == "root"
    assert users.from_authorization(None) is users.DEFAULT_USER
    with pytest.raises(errors.InvalidRequest):
        users.named("mallory")
    user = users.DEFAULT_USER
    assert user.run_as() == RunAs(1000, 1000, "user") and users.USERS["root"].run_as() is None
    assert user.resolve("a/../b") == "/home/user/b" and user.resolve("/etc") == "/etc"
    assert user.resolve(None) == "/home/user"


def test_start_runs_the_sdks_command_as_its_user() -> None:
    """Start's spec: the SDK's argv untouched (no wrapper: the agent switches), the
    user's identity, env and home; root's has no user (the agent's own)."""
    body = {"process": {"cmd": "/bin/bash", "args": ["-l", "-c", "id"], "envs": {"A": "1"}}}
    spec, config = processes.spawn_spec(body, users.DEFAULT_USER, 5.0)
    assert spec.cmd == ("/bin/bash", "-l", "-c", "id") and spec.user == RunAs(1000, 1000, "user")
    assert spec.env["HOME"] == "/home/user" and spec.env["A"] == "1"
    assert (spec.cwd, spec.timeout_s, config["cwd"]) == ("/home/user", 5.0, "/home/user")
    as_root, _ = processes.spawn_spec(body, users.USERS["root"], None)
    assert as_root.user is None and as_root.cmd == spec.cmd and as_root.cwd == "/root"


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


def test_e2b_data_keeps_who_made_the_sandbox() -> None:
    """The creator's tenant and key ride along (envd calls are charged to them); data
    written before they were kept reads as the built-in tenant without a key."""
    data = query.E2bData("tok", "client", "base", "tenant-a", "key-a")
    assert query.E2bData.decode({query.RESERVED_KEY: data.encode()}) == data
    legacy = query.E2bData.decode({query.RESERVED_KEY: '{"t": "x", "c": "c", "tpl": "base"}'})
    assert legacy is not None and (legacy.tenant_id, legacy.key_id) == ("local", None)


@pytest.mark.parametrize(
    ("header", "wanted"),
    [
        ("gzip", True),
        ("gzip, deflate", True),
        ("deflate, gzip;q=0.5", True),
        ("*", True),
        ("gzip;q=0", False),
        ("identity", False),
        ("", False),
        (None, False),
    ],
)
def test_accepts_gzip(header: str | None, wanted: bool) -> None:
    """A download is gzipped only when Accept-Encoding allows it."""
    assert envd.accepts_gzip(header) is wanted


def test_upload_metadata_headers() -> None:
    """X-Metadata-<Key> headers become lower-case keys; bad keys or values are 400s."""
    headers = {"X-Metadata-Owner": "Alice", "content-type": "x", "x-metadata-a.b": "1 2"}
    assert envd.upload_metadata(headers) == {"owner": "Alice", "a.b": "1 2"}
    assert envd.upload_metadata({"accept": "*/*"}) == {}
    for bad in ({"x-metadata-": "v"}, {"x-metadata-k(": "v"}, {"x-metadata-k": "\x01"}):
        with pytest.raises(errors.InvalidRequest):
            envd.upload_metadata(bad)


def _envd_request(front: Front, token: str | None) -> Request:
    headers = [(b"e2b-sandbox-id", b"sbx1")]
    if token is not None:
        headers.append((b"x-access-token", token.encode()))
    app = SimpleNamespace(state=SimpleNamespace(e2b=front))
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/health",
        "headers": headers,
        "client": ("192.0.2.9", 5000),
        "app": app,
    }
    return Request(scope)


class _OneSandbox:
    """The manager's ``get`` for one running E2B sandbox made by key ``key-a``."""

    def __init__(self) -> None:
        data = query.E2bData("secret-token", "c", "base", "tenant-a", "key-a")
        now = datetime.now(UTC)
        self.record = SandboxRecord(
            id="sbx1",
            state=SandboxState.RUNNING,
            image="default",
            vcpus=1,
            memory_mib=256,
            metadata={query.RESERVED_KEY: data.encode()},
            env={},
            timeout_s=300,
            created_at=now,
            expires_at=now,
            ip_address=None,
            vmm_pid=None,
            work_dir=None,
            error=None,
        )

    async def get(self, sandbox_id: str) -> SandboxRecord:
        if sandbox_id != self.record.id:
            raise errors.NotFound(sandbox_id)
        return self.record


@pytest.mark.anyio
async def test_envd_calls_spend_the_creating_keys_rate_limit() -> None:
    """envd calls take from the creating key's bucket, shared with its control-plane
    calls; a wrong token costs the key nothing (the client's address pays); token-less
    interpreter calls have a bucket of their own."""
    now = [0.0]
    settings = Settings(rate_limit_per_s=1.0, rate_limit_burst=3)
    tenancy = Tenancy(settings, clock=lambda: now[0])
    front = Front(settings, cast(SandboxManager, _OneSandbox()), tenancy)
    call = await envd_call(_envd_request(front, "secret-token"))
    assert (call.data.tenant_id, call.data.key_id) == ("tenant-a", "key-a")
    assert tenancy.limiter.take("key-a") == 0.0  # a control-plane call of the same key
    for _ in range(5):
        with pytest.raises(errors.Unauthorized):
            await envd_call(_envd_request(front, "wrong"))
    for _ in range(3):
        await envd_call(_envd_request(front, None), token_optional=True)
    await envd_call(_envd_request(front, "secret-token"))  # the third of key-a's burst
    with pytest.raises(errors.RateLimited) as limited:
        await envd_call(_envd_request(front, "secret-token"))
    assert limited.value.status_code == 429 and "key-a" in limited.value.message
    assert retry_after(limited.value) == {"Retry-After": "1"}
    now[0] += 1.0
    await envd_call(_envd_request(front, "secret-token"))  # refilled


def test_login_profiles_run_no_command(tmp_path: Path) -> None:
    """The image's /etc/profile and root's .profile start no process in bash (no `id`,
    no `mesg`: with an empty PATH they would fail loudly) and set Debian's PATH."""
    etc = tmp_path / "etc"
    etc.mkdir()
    (tmp_path / "root").mkdir()
    rootfs.add_user(tmp_path)
    profile, dot_profile = tmp_path / "etc" / "profile", tmp_path / "root" / ".profile"
    assert profile.read_text() == rootfs.LOGIN_PROFILES["etc/profile"]
    script = f". {profile}; HOME={tmp_path}/root; . {dot_profile}; echo $PATH"
    done = subprocess.run(
        ["/bin/bash", "--noprofile", "--norc", "-c", script],
        env={"PATH": "/nonexistent"},
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert done.stderr == "" and done.returncode == 0
    want = "/usr/local/sbin" if os.geteuid() == 0 else "/usr/local/games"
    assert want in done.stdout


def test_only_compressible_downloads_are_gzipped() -> None:
    """Text is worth gzip; random bytes and an empty file are sent as they are."""
    assert envd.compressible(b"the same line again\n" * 500)
    assert not envd.compressible(os.urandom(100_000))
    assert not envd.compressible(b"")
