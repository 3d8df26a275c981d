"""Regressions for what the API fuzzer (tests/hostile/test_fuzz.py) found, without a VM:
byte streams that fail before their first byte, the agent archiving /proc/self/fd, guest
memory too small to boot, and request schemas that document what the server refuses."""

from __future__ import annotations

import io
import json
import tarfile
from typing import Any

import jsonschema
import pytest
from pydantic import ValidationError

from emberbox import errors
from emberbox.agent_client.client import AgentClient
from emberbox.api.streams import StreamedResponse, Write, ndjson_response
from emberbox.config import Settings
from emberbox.models import ExecRequest, SandboxCreate
from emberbox.service.sandboxes.validation import validate_spec
from tests.support.agent import collect

pytestmark = pytest.mark.anyio

Message = dict[str, Any]


async def _serve(response: StreamedResponse) -> list[Message]:
    """The ASGI messages ``response`` sends to a client that never disconnects."""
    sent: list[Message] = []

    async def receive() -> Message:
        await _forever()
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "path": "/v1/sandboxes/x/files", "method": "GET"}
    await response(scope, receive, send)
    return sent


async def _forever() -> None:
    import anyio

    await anyio.sleep_forever()


async def test_byte_stream_failing_before_its_first_byte_is_an_error_answer() -> None:
    """An unreadable file (/proc/self/mem: EIO on the first read) is a 400 with the error
    body, not a 200 whose body is cut short."""

    async def produce(write: Write) -> None:
        raise errors.AgentRequestFailed("AgentError: Input/output error: /proc/self/mem")

    sent = await _serve(StreamedResponse(produce))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 400
    body = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    assert body["error"]["type"] == "AgentRequestFailed"
    assert "/proc/self/mem" in body["error"]["message"]
    assert sent[-1].get("more_body", False) is False


async def test_byte_stream_failing_later_is_cut_short_and_empty_one_completes() -> None:
    """After its first byte a failure can only cut the body short; no bytes at all is an
    empty 200."""

    async def fails_late(write: Write) -> None:
        await write(b"partial")
        raise errors.AgentRequestFailed("gone")

    async def empty(write: Write) -> None:
        return None

    late = await _serve(StreamedResponse(fails_late))
    assert late[0]["status"] == 200
    assert [m.get("more_body") for m in late[1:]] == [True]  # no final chunk
    done = await _serve(StreamedResponse(empty))
    assert done[0]["status"] == 200
    assert done[1:] == [{"type": "http.response.body", "body": b"", "more_body": False}]


async def test_ndjson_stream_starts_at_once() -> None:
    """An NDJSON answer's status line goes out before its first event (errors are events)."""
    order: list[str] = []

    async def produce(write: Write) -> None:
        order.append("produce")
        await write(b'{"type": "stdout", "data": "x"}\n')

    response = ndjson_response(produce)
    sent: list[Message] = []

    async def send(message: Message) -> None:
        order.append(message["type"])
        sent.append(message)

    async def receive() -> Message:
        await _forever()
        raise AssertionError("unreachable")

    await response({"type": "http", "path": "/x"}, receive, send)
    assert order[:2] == ["http.response.start", "produce"]
    assert sent[0]["status"] == 200


async def test_agent_archives_proc_self_fd(client: AgentClient) -> None:
    """/proc/self/fd loses the agent's own listing fd between listing and readlink: that
    member is skipped, the archive completes (was: FileNotFoundError, stream cut short)."""
    archive = await collect(client.tar_out("/proc/self/fd"))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        members = tar.getmembers()
    assert members and all(m.issym() for m in members)


def _accepts(schema: dict[str, Any], instance: object) -> bool:
    return jsonschema.Draft202012Validator(schema).is_valid(instance)


@pytest.mark.parametrize("model", [SandboxCreate, ExecRequest])
def test_env_schema_refuses_the_names_the_server_refuses(model: type[Any]) -> None:
    """The documented `env` refuses names that are not shell variable names, as the
    server does (it used to document any other name, with any value, as accepted)."""
    env_schema = model.model_json_schema()["properties"]["env"]
    base = {"cmd": "true"} if model is ExecRequest else {}
    for env in ({"A-B": "x"}, {"": "x"}, {"1A": [1]}):
        assert not _accepts(env_schema, env)
        with pytest.raises(ValidationError):
            model(**base, env=env)
    assert _accepts(env_schema, {"PATH_2": "/bin"})
    assert model(**base, env={"PATH_2": "/bin"}).env == {"PATH_2": "/bin"}


def test_memory_below_what_boots_is_refused_up_front() -> None:
    """memory_mib 64 passed validation and crashed the guest at boot (a 502 after the
    boot); less than 128 MiB is now a 422 on the wire and a 400 from the service."""
    with pytest.raises(ValidationError, match="memory_mib"):
        SandboxCreate(memory_mib=127)
    assert SandboxCreate(memory_mib=128).memory_mib == 128
    with pytest.raises(errors.InvalidRequest, match="memory_mib must be an integer from 128"):
        validate_spec(
            Settings(),
            image=None,
            vcpus=None,
            memory_mib=64,
            timeout_s=None,
            metadata=None,
            env=None,
        )
