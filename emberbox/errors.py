"""The one exception tree of emberbox.

Every error the library, the server, the SDK or the CLI raises on purpose is one of these::

    EmberboxError
    ├── InvalidRequest          bad input from a caller (HTTP 400 / 422)
    │   └── ImageNotFound       unknown image name; carries the available names
    ├── Unauthorized            no or wrong API key (HTTP 401)
    ├── NotFound                no such sandbox / snapshot (HTTP 404)
    ├── Conflict                the object is in a state that forbids the call (HTTP 409)
    │   └── SnapshotMismatch    a snapshot made by another VMM, version, image or VM shape
    ├── QuotaExceeded           a configured limit would be passed (HTTP 403 / 429)
    │   ├── PayloadTooLarge     an upload over max_upload_bytes (HTTP 413)
    │   └── RateLimited         a key sent requests faster than its rate (HTTP 429)
    ├── ImageBuildError         building a guest image failed (a step and its output)
    ├── HostError               the host lacks something (QEMU, KVM, space) (HTTP 503)
    │   ├── StorageFull         the data dir's disk is (nearly) full (HTTP 507)
    │   ├── NoCapacity          cluster: every host full or draining (HTTP 503, Retry-After)
    │   └── HostDown            cluster: the sandbox's host is unreachable (HTTP 503)
    ├── VMMError                the virtual machine monitor misbehaved (HTTP 502)
    │   ├── BootTimeout         no agent handshake within the boot timeout
    │   ├── VMMCrashed          the VMM process ended unexpectedly
    │   └── SnapshotCorrupt     a snapshot file could not be loaded (names the file)
    └── AgentError              the guest agent failed us (HTTP 502)
        ├── ProtocolError       bytes on the agent channel that are not our protocol
        ├── AgentDisconnected   the agent channel closed
        ├── AgentRequestFailed  the agent answered a request with an error
        └── ExecTimeout         a command ran past its timeout (carries the partial result)

Errors carry data (``console_tail``, ``available``, ``result``) so that callers never
parse messages. The HTTP layer maps classes to status codes in one place and the SDK
maps them back, so a caller catches the same class locally and remotely.
"""

from __future__ import annotations

from typing import Any


class EmberboxError(Exception):
    """Root of every error emberbox raises on purpose."""

    status_code = 500

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def __str__(self) -> str:
        return self.message


class InvalidRequest(EmberboxError):
    status_code = 400


class ImageNotFound(InvalidRequest):
    def __init__(self, name: str, available: list[str]) -> None:
        names = ", ".join(available) if available else "none (run `emberbox image build`)"
        super().__init__(f"unknown image {name!r}; available images: {names}", available=available)
        self.name = name
        self.available = available


class Unauthorized(EmberboxError):
    status_code = 401


class NotFound(EmberboxError):
    status_code = 404


class Conflict(EmberboxError):
    status_code = 409


class SnapshotMismatch(Conflict):
    pass


class QuotaExceeded(EmberboxError):
    status_code = 403


class PayloadTooLarge(QuotaExceeded):
    status_code = 413


class RateLimited(QuotaExceeded):
    """Too many requests from one key; ``retry_after_s`` says when one more will pass."""

    status_code = 429
    retry_after_s = 1.0  # (an instance rebuilt by the SDK has only this)

    def __init__(self, message: str, retry_after_s: float = 1.0, **details: Any) -> None:
        super().__init__(message, retry_after_s=retry_after_s, **details)
        self.retry_after_s = retry_after_s


class ImageBuildError(EmberboxError):
    status_code = 500


class HostError(EmberboxError):
    status_code = 503


class StorageFull(HostError):
    """The server's data dir has no room (ENOSPC, SQLITE_FULL, or under min_free_disk_mib)."""

    status_code = 507


class NoCapacity(HostError):
    """Cluster: no host can take the sandbox now; ``retry_after_s`` says when to try again."""

    status_code = 503
    retry_after_s = 5.0  # (an instance rebuilt by the SDK has only this)

    def __init__(self, message: str, retry_after_s: float = 5.0, **details: Any) -> None:
        super().__init__(message, retry_after_s=retry_after_s, **details)
        self.retry_after_s = retry_after_s


class HostDown(HostError):
    """Cluster: the host that holds the sandbox (or snapshot) does not answer."""

    status_code = 503


class VMMError(EmberboxError):
    status_code = 502

    def __init__(self, message: str, console_tail: str = "", **details: Any) -> None:
        super().__init__(message, **details)
        self.console_tail = console_tail

    def __str__(self) -> str:
        if not self.console_tail:
            return self.message
        return f"{self.message}\n--- console (last lines) ---\n{self.console_tail}"


class BootTimeout(VMMError):
    pass


class VMMCrashed(VMMError):
    pass


class SnapshotCorrupt(VMMError):
    pass


class AgentError(EmberboxError):
    status_code = 502


class ProtocolError(AgentError):
    pass


class AgentDisconnected(AgentError):
    pass


class AgentRequestFailed(AgentError):
    status_code = 400


class ExecTimeout(AgentError):
    status_code = 504

    def __init__(self, message: str, result: Any = None) -> None:
        super().__init__(message)
        self.result = result


def all_error_classes() -> dict[str, type[EmberboxError]]:
    """Every class of the tree by name (the SDK maps wire names back with it)."""
    found: dict[str, type[EmberboxError]] = {}
    pending: list[type[EmberboxError]] = [EmberboxError]
    while pending:
        cls = pending.pop()
        found[cls.__name__] = cls
        pending.extend(cls.__subclasses__())
    return found
