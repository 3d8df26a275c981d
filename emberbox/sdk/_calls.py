"""What the sync and async clients share: configuration, request building, parsing.

Each API call is a pure function returning a :class:`Call` (method, path, JSON body,
query and how long to wait for the answer); each answer is parsed by a pure function.
:mod:`emberbox.sdk._sync` and :mod:`emberbox.sdk._async` only differ in how they send
a ``Call``, so the two clients cannot drift apart.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import pydantic

from emberbox import errors
from emberbox.models import ExecResponse, SandboxList, SandboxPublic, SnapshotList, SnapshotPublic

DEFAULT_URL = "http://127.0.0.1:8080"
URL_ENV = "EMBERBOX_URL"
API_KEY_ENV = "EMBERBOX_API_KEY"

CONNECT_TIMEOUT_S = 10.0
DEFAULT_WAIT_S = 30.0  # get, list, timeout
KILL_WAIT_S = 120.0  # teardown of a wedged VMM can take a while
CREATE_WAIT_S = 300.0  # boot: Settings.boot_timeout_s x boot_attempts, with room to spare
SAVE_WAIT_S = 360.0  # snapshot, pause, resume: Settings.snapshot_timeout_s (300), and room
EXEC_MARGIN_S = 30.0  # added to a command's own timeout
EXEC_DEFAULT_WAIT_S = 3600.0 + EXEC_MARGIN_S  # no timeout given: the server's limit applies


class SandboxInfo(SandboxPublic):
    """A sandbox as the server describes it (``id``, ``state``, ``expires_at`` ...)."""


class SnapshotInfo(SnapshotPublic):
    """A snapshot as the server describes it (``id``, ``sandbox_id``, ``size_bytes`` ...)."""


class CommandResult(ExecResponse):
    """What a finished command left: ``exit_code``, ``stdout``, ``stderr`` (text),
    ``duration_ms`` and ``timed_out``."""


@dataclass(frozen=True)
class ClientConfig:
    """Where the server is and how to authenticate: argument > environment > default."""

    url: str
    api_key: str | None = field(default=None, repr=False)

    @classmethod
    def resolve(cls, url: str | None = None, api_key: str | None = None) -> ClientConfig:
        url = url or os.environ.get(URL_ENV) or DEFAULT_URL
        api_key = api_key or os.environ.get(API_KEY_ENV) or None
        return cls(url=url.rstrip("/"), api_key=api_key)

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for ``httpx.Client`` / ``httpx.AsyncClient``."""
        headers = {"Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return {"base_url": self.url, "headers": headers, "timeout": DEFAULT_WAIT_S}


@dataclass(frozen=True)
class Call:
    """One HTTP request, ready for either transport."""

    method: str
    path: str
    json: dict[str, Any] | None = None
    params: list[tuple[str, str]] | None = None
    wait_s: float | None = DEFAULT_WAIT_S  # for each read and write; None: no limit
    content: Any = None  # a raw body: bytes, or an iterator of them (streamed)
    headers: dict[str, str] | None = None

    def request_options(self) -> dict[str, Any]:
        """Keyword arguments for ``client.request`` and ``client.stream``."""
        options: dict[str, Any] = {
            "method": self.method,
            "url": self.path,
            "json": self.json,
            "params": self.params,
            "timeout": httpx.Timeout(self.wait_s, connect=CONNECT_TIMEOUT_S),
        }
        if self.content is not None:
            options["content"] = self.content
        if self.headers is not None:
            options["headers"] = self.headers
        return options


def _without_none(**fields: Any) -> dict[str, Any]:
    return {name: value for name, value in fields.items() if value is not None}


def create_call(
    image: str | None,
    vcpus: int | None,
    memory_mib: int | None,
    timeout_s: int | None,
    metadata: Mapping[str, str] | None,
    env: Mapping[str, str] | None,
    snapshot_id: str | None = None,
    network: Mapping[str, object] | None = None,
) -> Call:
    body = _without_none(
        image=image,
        vcpus=vcpus,
        memory_mib=memory_mib,
        timeout_s=timeout_s,
        metadata=None if metadata is None else dict(metadata),
        env=None if env is None else dict(env),
        snapshot_id=snapshot_id,
        network=None if network is None else dict(network),
    )
    return Call("POST", "/v1/sandboxes", json=body, wait_s=CREATE_WAIT_S)


def list_call(state: str | None, metadata: Mapping[str, str] | None) -> Call:
    params = [] if state is None else [("state", str(state))]
    params += [(f"metadata.{key}", value) for key, value in (metadata or {}).items()]
    return Call("GET", "/v1/sandboxes", params=params)


def get_call(sandbox_id: str) -> Call:
    return Call("GET", f"/v1/sandboxes/{_quote(sandbox_id)}")


def kill_call(sandbox_id: str) -> Call:
    return Call("DELETE", f"/v1/sandboxes/{_quote(sandbox_id)}", wait_s=KILL_WAIT_S)


def timeout_call(sandbox_id: str, timeout_s: int) -> Call:
    path = f"/v1/sandboxes/{_quote(sandbox_id)}/timeout"
    return Call("POST", path, json={"timeout_s": timeout_s})


def pause_call(sandbox_id: str) -> Call:
    return Call("POST", f"/v1/sandboxes/{_quote(sandbox_id)}/pause", wait_s=SAVE_WAIT_S)


def resume_call(sandbox_id: str) -> Call:
    return Call("POST", f"/v1/sandboxes/{_quote(sandbox_id)}/resume", wait_s=SAVE_WAIT_S)


def snapshot_call(sandbox_id: str) -> Call:
    return Call("POST", f"/v1/sandboxes/{_quote(sandbox_id)}/snapshots", wait_s=SAVE_WAIT_S)


def list_snapshots_call(sandbox_id: str | None) -> Call:
    params = [] if sandbox_id is None else [("sandbox_id", sandbox_id)]
    return Call("GET", "/v1/snapshots", params=params)


def get_snapshot_call(snapshot_id: str) -> Call:
    return Call("GET", f"/v1/snapshots/{_quote(snapshot_id, 'snapshot')}")


def delete_snapshot_call(snapshot_id: str) -> Call:
    return Call("DELETE", f"/v1/snapshots/{_quote(snapshot_id, 'snapshot')}", wait_s=KILL_WAIT_S)


def run_call(
    sandbox_id: str,
    cmd: list[str] | str,
    env: Mapping[str, str] | None,
    cwd: str | None,
    timeout_s: float | None,
    stdin: str | None,
    stream: bool = False,
) -> Call:
    body = _without_none(
        cmd=cmd if isinstance(cmd, str) else list(cmd),
        env=None if env is None else dict(env),
        cwd=cwd,
        timeout_s=timeout_s,
        stdin=stdin,
        stream=stream or None,
    )
    wait_s = EXEC_DEFAULT_WAIT_S if timeout_s is None else float(timeout_s) + EXEC_MARGIN_S
    return Call("POST", f"/v1/sandboxes/{_quote(sandbox_id)}/exec", json=body, wait_s=wait_s)


def _quote(object_id: str, what: str = "sandbox") -> str:
    # Ids are server-made tokens; refuse anything that could change the path.
    if not object_id or any(c in object_id for c in "/?#%\\") or object_id in (".", ".."):
        raise errors.InvalidRequest(f"not a {what} id: {object_id!r}")
    return object_id


# --- answers -----------------------------------------------------------------------------

Model = TypeVar("Model", bound=pydantic.BaseModel)


def parse(model: type[Model], response: httpx.Response) -> Model:
    """The body of a successful answer as ``model``; an error answer raises its class."""
    raise_for_error(response)
    try:
        return model.model_validate_json(response.content)
    except pydantic.ValidationError as exc:
        raise errors.EmberboxError(
            f"unexpected answer from {response.request.url}: {exc.error_count()} invalid fields"
        ) from exc


def parse_list(response: httpx.Response) -> list[SandboxInfo]:
    sandboxes = parse(SandboxList, response).sandboxes
    return [SandboxInfo.model_validate(item.model_dump()) for item in sandboxes]


def parse_snapshot_list(response: httpx.Response) -> list[SnapshotInfo]:
    snapshots = parse(SnapshotList, response).snapshots
    return [SnapshotInfo.model_validate(item.model_dump()) for item in snapshots]


def raise_for_error(response: httpx.Response) -> None:
    if response.status_code >= 400:
        raise error_from_response(response)


def error_from_response(response: httpx.Response) -> errors.EmberboxError:
    """The exception the server raised, as the same class of :mod:`emberbox.errors`."""
    try:
        detail = response.json()["error"]
        valid = isinstance(detail, dict) and {"type", "message"} <= set(detail)
    except (ValueError, KeyError, TypeError):
        valid = False
    if not valid:
        text = response.text.strip().replace("\n", " ")[:300]
        return errors.EmberboxError(
            f"HTTP {response.status_code} from {response.request.url}: {text or 'no body'}",
            status_code=response.status_code,
        )
    exc = error_from_body(detail, response.status_code)
    if isinstance(exc, errors.RateLimited | errors.NoCapacity):
        exc.retry_after_s = retry_after_s(response, exc.retry_after_s)
    return exc


def retry_after_s(response: httpx.Response, default: float) -> float:
    """The answer's ``Retry-After`` in seconds (RateLimited, NoCapacity); ``default``
    without a usable one."""
    text = response.headers.get("retry-after", "").strip()
    return float(text) if text.isdigit() else default


def error_from_body(
    detail: Mapping[str, Any], status_code: int | None = None
) -> errors.EmberboxError:
    """The class named by an error body's ``type`` (also the ``error`` of a stream's
    ``error`` event), carrying the body's fields; ``status_code`` defaults to the
    class's own (a stream's errors come after its 200)."""
    type_name = str(detail.get("type") or "EmberboxError")
    message = str(detail.get("message") or type_name)
    cls = errors.all_error_classes().get(type_name)
    if cls is None:
        # ValidationError is the 422 of the schema check; anything else is a foreign name.
        cls = errors.InvalidRequest if type_name == "ValidationError" else errors.EmberboxError
    exc = cls.__new__(cls)
    status = cls.status_code if status_code is None else status_code
    errors.EmberboxError.__init__(exc, message, status_code=status, remote_type=type_name)
    if isinstance(exc, errors.ImageNotFound):
        exc.name = str(detail.get("image") or "")
        exc.available = [str(name) for name in detail.get("available") or []]
    if isinstance(exc, errors.VMMError):
        exc.console_tail = str(detail.get("console_tail") or "")
    if isinstance(exc, errors.ExecTimeout):
        exc.result = None
    return exc


def transport_error(exc: httpx.TransportError, config: ClientConfig) -> errors.HostError:
    """A network failure as HostError naming the server it could not talk to."""
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        message = f"cannot reach emberbox at {config.url}: {exc or type(exc).__name__}"
    elif isinstance(exc, httpx.TimeoutException):
        message = f"emberbox at {config.url} did not answer in time ({type(exc).__name__})"
    else:
        message = f"lost the connection to emberbox at {config.url}: {exc or type(exc).__name__}"
    return errors.HostError(message, url=config.url)
