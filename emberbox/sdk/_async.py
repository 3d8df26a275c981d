"""The asyncio client: :class:`AsyncSandbox`. Mirrors :mod:`emberbox.sdk._sync` call for call."""

from __future__ import annotations

import builtins
from collections.abc import Mapping
from types import TracebackType

import anyio
import httpx

from emberbox import errors
from emberbox.sdk import _calls
from emberbox.sdk._calls import Call, ClientConfig, CommandResult, SandboxInfo


async def _send(client: httpx.AsyncClient, config: ClientConfig, call: Call) -> httpx.Response:
    try:
        return await client.request(**call.request_options())
    except httpx.TransportError as exc:
        raise _calls.transport_error(exc, config) from exc


class AsyncCommands:
    """``sandbox.commands``: run commands in the sandbox."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox

    async def run(
        self,
        cmd: list[str] | str,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout_s: float | None = None,
        stdin: str | None = None,
    ) -> CommandResult:
        """Run a command to completion and return its exit code and output.

        A string runs through ``/bin/sh -c``; a list is an argv. ``timeout_s`` (seconds)
        kills the command when it runs longer (the result then has ``timed_out=True``);
        without it the server's default applies. A non-zero exit code is not an error.

        >>> await sb.commands.run("python3 -c 'print(6*7)'").stdout
        '42\\n'
        """
        call = _calls.run_call(self._sandbox.id, cmd, env, cwd, timeout_s, stdin)
        return _calls.parse(CommandResult, await self._sandbox._request(call))


class AsyncSandbox:
    """A microVM sandbox on an emberbox server (asyncio client).

    >>> async with await AsyncSandbox.create() as sb:
    ...     print((await sb.commands.run("uname -r")).stdout)

    The server is ``url`` or ``$EMBERBOX_URL`` (default ``http://127.0.0.1:8080``); the
    key is ``api_key`` or ``$EMBERBOX_API_KEY``. Leaving an ``async with`` block kills it.
    """

    def __init__(
        self, sandbox_id: str, *, url: str | None = None, api_key: str | None = None
    ) -> None:
        """A handle on an existing sandbox, without contacting the server (see connect)."""
        self.id = sandbox_id
        self._config = ClientConfig.resolve(url, api_key)
        self._client: httpx.AsyncClient | None = None  # opened on first use, again after close()
        self.commands = AsyncCommands(self)

    def __repr__(self) -> str:
        return f"AsyncSandbox(id={self.id!r}, url={self._config.url!r})"

    @classmethod
    async def create(
        cls,
        image: str | None = None,
        *,
        vcpus: int | None = None,
        memory_mib: int | None = None,
        timeout_s: int | None = None,
        metadata: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
        url: str | None = None,
        api_key: str | None = None,
    ) -> AsyncSandbox:
        """Boot a new sandbox and return once its agent answers (waits up to 300 s).

        ``timeout_s`` is its lifetime in seconds, ``memory_mib`` its memory in MiB;
        unset values take the server's defaults. ``metadata`` labels it for ``list``.

        >>> sb = await AsyncSandbox.create("default", timeout_s=600, metadata={"user": "ada"})
        """
        call = _calls.create_call(image, vcpus, memory_mib, timeout_s, metadata, env)
        info = await _request_once(call, url, api_key, SandboxInfo)
        return cls(info.id, url=url, api_key=api_key)

    @classmethod
    async def connect(
        cls, sandbox_id: str, *, url: str | None = None, api_key: str | None = None
    ) -> AsyncSandbox:
        """A handle on an existing sandbox; raises NotFound when the server has none.

        >>> sb = await AsyncSandbox.connect("sb-1234")
        """
        sandbox = cls(sandbox_id, url=url, api_key=api_key)
        try:
            await sandbox.info()
        except BaseException:
            await sandbox.close()
            raise
        return sandbox

    @classmethod
    async def list(
        cls,
        *,
        state: str | None = None,
        metadata: Mapping[str, str] | None = None,
        url: str | None = None,
        api_key: str | None = None,
    ) -> builtins.list[SandboxInfo]:
        """Sandboxes on the server, optionally only in ``state`` and with all ``metadata``.

        >>> [s.id for s in await AsyncSandbox.list(state="running", metadata={"user": "ada"})]
        """
        config = ClientConfig.resolve(url, api_key)
        async with httpx.AsyncClient(**config.client_options()) as client:
            return _calls.parse_list(await _send(client, config, _calls.list_call(state, metadata)))

    async def info(self) -> SandboxInfo:
        """What the server says about this sandbox now (state, expires_at, ip_address ...)."""
        return _calls.parse(SandboxInfo, await self._request(_calls.get_call(self.id)))

    async def get_info(self) -> SandboxInfo:
        """Same as :meth:`info`."""
        return await self.info()

    async def set_timeout(self, timeout_s: int) -> SandboxInfo:
        """Kill the sandbox ``timeout_s`` seconds from now (instead of its old deadline).

        >>> (await sb.set_timeout(3600)).expires_at
        """
        return _calls.parse(
            SandboxInfo, await self._request(_calls.timeout_call(self.id, timeout_s))
        )

    async def kill(self) -> None:
        """Stop the sandbox and free its resources. Killing it twice is fine."""
        _calls.raise_for_error(await self._request(_calls.kill_call(self.id)))

    async def close(self) -> None:
        """Release the HTTP connection (the sandbox keeps running)."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with anyio.CancelScope(shield=True):  # a cancelled block still kills its sandbox
            try:
                await self.kill()
            except errors.EmberboxError:
                if exc is None:
                    raise  # else let the error from the block through, not this one
            finally:
                await self.close()

    async def _request(self, call: Call) -> httpx.Response:
        if self._client is None:
            self._client = httpx.AsyncClient(**self._config.client_options())
        return await _send(self._client, self._config, call)


async def _request_once(
    call: Call, url: str | None, api_key: str | None, model: type[SandboxInfo]
) -> SandboxInfo:
    config = ClientConfig.resolve(url, api_key)
    async with httpx.AsyncClient(**config.client_options()) as client:
        return _calls.parse(model, await _send(client, config, call))
