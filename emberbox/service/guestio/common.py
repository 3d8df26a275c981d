"""What the process and file services share: the running sandbox a call goes to, telling
a sandbox stopped mid-call (Conflict) from a failing agent, and uploads that stop at a
size limit (PayloadTooLarge, HTTP 413) without leaving an agent request half open."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterable, AsyncIterator
from typing import TYPE_CHECKING, Protocol

from emberbox import errors
from emberbox.config import Settings
from emberbox.service.sandboxes.state import SandboxState

if TYPE_CHECKING:
    from emberbox.agent_client.calls import AgentCalls
    from emberbox.service.sandboxes.manager import SandboxHandle, SandboxRecord

MAX_PATH_LENGTH = 4096


class LiveSandboxes(Protocol):
    """What the services need of :class:`~emberbox.service.sandboxes.manager.SandboxManager`."""

    async def get(self, sandbox_id: str) -> SandboxRecord: ...
    async def running_handle(self, sandbox_id: str) -> tuple[SandboxRecord, SandboxHandle]: ...


class GuestService:
    """Base of ``manager.processes`` and ``manager.files``."""

    def __init__(self, sandboxes: LiveSandboxes, settings: Settings) -> None:
        self._sandboxes = sandboxes
        self._settings = settings

    @contextlib.asynccontextmanager
    async def _guest(self, sandbox_id: str) -> AsyncIterator[tuple[SandboxRecord, AgentCalls]]:
        """The running sandbox's record and agent (NotFound, Conflict otherwise). An agent
        failure inside the block is a Conflict when the sandbox stopped meanwhile."""
        record, handle = await self._sandboxes.running_handle(sandbox_id)
        try:
            yield record, handle.agent
        except errors.AgentError as exc:
            if isinstance(exc, errors.AgentRequestFailed | errors.ExecTimeout):
                raise  # the agent answered: the sandbox is fine
            current = await self._sandboxes.get(sandbox_id)
            if current.state is not SandboxState.RUNNING:
                raise errors.Conflict(
                    f"sandbox {sandbox_id} is {current.state.value}",
                    sandbox_id=sandbox_id,
                    state=current.state.value,
                ) from exc
            raise

    def check_upload_size(self, size: int | None) -> None:
        """Refuse an upload whose announced size passes ``max_upload_bytes`` up front."""
        limit = self._settings.max_upload_bytes
        if size is not None and size > limit:
            raise upload_too_large(limit, size)

    def _counted(self, chunks: AsyncIterable[bytes]) -> Counted:
        return Counted(chunks, self._settings.max_upload_bytes)


class Counted:
    """Passes ``source``'s chunks through, at most ``limit`` bytes of them.

    When the source passes the limit or fails (a client that went away mid-upload) the
    stream ends early but normally, so that the agent's request still gets its end
    marker and answers; :meth:`check` then raises why it ended.
    """

    def __init__(self, source: AsyncIterable[bytes], limit: int) -> None:
        self._source = source
        self._limit = limit
        self.count = 0
        self.error: Exception | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._source:
                self.count += len(chunk)
                if self.count > self._limit:
                    self.error = upload_too_large(self._limit)
                    return
                if chunk:
                    yield chunk
        except Exception as exc:  # the source's own failure, raised again by check()
            self.error = exc

    def check(self) -> None:
        if self.error is not None:
            raise self.error


def upload_too_large(limit: int, size: int | None = None) -> errors.PayloadTooLarge:
    """HTTP 413: the upload passes ``max_upload_bytes``."""
    given = "" if size is None else f" ({size} bytes)"
    return errors.PayloadTooLarge(
        f"upload too large{given}: the server takes at most {limit} bytes (max_upload_bytes)",
        limit=limit,
    )


def checked_path(path: object, what: str = "path") -> str:
    """A guest path as the agent takes it: a non-empty string without NUL bytes."""
    if not isinstance(path, str) or not path or "\0" in path or len(path) > MAX_PATH_LENGTH:
        raise errors.InvalidRequest(f"invalid {what} {path!r}", field=what)
    return path


async def close_iterator(iterator: AsyncIterator[bytes]) -> None:
    """Finish an async generator now (its ``finally`` ends the agent request)."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()
