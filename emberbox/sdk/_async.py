"""The asyncio client: :class:`AsyncSandbox`. Mirrors :mod:`emberbox.sdk._sync` call for call."""

from __future__ import annotations

import builtins
import contextlib
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import Literal, overload

import anyio
import httpx

from emberbox import errors
from emberbox.models import ProcessStarted
from emberbox.sdk import _calls, _guest, _ports
from emberbox.sdk._async_guest import AsyncCommandHandle, AsyncFiles, AsyncPty, collect_events
from emberbox.sdk._calls import Call, ClientConfig, CommandResult, SandboxInfo, SnapshotInfo
from emberbox.sdk._guest import OutputCollector, OutputHandler, ProcessInfo
from emberbox.sdk._ports import AsyncPorts


async def _send(client: httpx.AsyncClient, config: ClientConfig, call: Call) -> httpx.Response:
    try:
        return await client.request(**call.request_options())
    except httpx.TransportError as exc:
        raise _calls.transport_error(exc, config) from exc


class AsyncCommands:
    """``sandbox.commands``: run commands in the sandbox."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox

    @overload
    async def run(
        self,
        cmd: list[str] | str,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout_s: float | None = None,
        stdin: str | None = None,
        background: Literal[False] = False,
        on_stdout: OutputHandler | None = None,
        on_stderr: OutputHandler | None = None,
    ) -> CommandResult: ...

    @overload
    async def run(
        self,
        cmd: list[str] | str,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout_s: float | None = None,
        stdin: str | None = None,
        background: Literal[True],
        on_stdout: OutputHandler | None = None,
        on_stderr: OutputHandler | None = None,
    ) -> AsyncCommandHandle: ...

    async def run(
        self,
        cmd: list[str] | str,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout_s: float | None = None,
        stdin: str | None = None,
        background: bool = False,
        on_stdout: OutputHandler | None = None,
        on_stderr: OutputHandler | None = None,
    ) -> CommandResult | AsyncCommandHandle:
        """Run a command to completion and return its exit code and output.

        A string runs through ``/bin/sh -c``; a list is an argv. ``timeout_s`` (seconds)
        kills the command when it runs longer (the result then has ``timed_out=True``);
        without it the server's default applies. A non-zero exit code is not an error.
        ``on_stdout``/``on_stderr`` (plain or async functions) get the output as text
        while it runs.

        With ``background=True`` it returns at once an :class:`AsyncCommandHandle`
        (``wait``, ``kill``, ``send_stdin``); the command keeps running across other
        calls, and ``timeout_s`` defaults to none.

        >>> (await sb.commands.run("python3 -c 'print(6*7)'")).stdout
        '42\\n'
        >>> await sb.commands.run("for i in 1 2 3; do echo $i; sleep 1; done", on_stdout=print)
        """
        sandbox_id = self._sandbox.id
        if background:
            call = _guest.spawn_call(sandbox_id, cmd, env, cwd, timeout_s)
            pid = _calls.parse(ProcessStarted, await self._sandbox._request(call)).pid
            handle = AsyncCommandHandle(
                self._sandbox, pid, on_stdout=on_stdout, on_stderr=on_stderr
            )
            if stdin is not None:
                await handle.send_stdin(stdin)
            return handle
        if on_stdout is None and on_stderr is None:
            call = _calls.run_call(sandbox_id, cmd, env, cwd, timeout_s, stdin)
            return _calls.parse(CommandResult, await self._sandbox._request(call))
        collector = OutputCollector(on_stdout, on_stderr)
        call = _calls.run_call(sandbox_id, cmd, env, cwd, timeout_s, stdin, stream=True)
        async with self._sandbox._stream(call) as response:
            await collect_events(response, collector)
        return collector.result()

    async def connect(
        self,
        pid: int,
        *,
        on_stdout: OutputHandler | None = None,
        on_stderr: OutputHandler | None = None,
    ) -> AsyncCommandHandle:
        """A handle on a background command started earlier (see :meth:`list`)."""
        handle = AsyncCommandHandle(self._sandbox, pid, on_stdout=on_stdout, on_stderr=on_stderr)
        await handle.status()  # NotFound when there is no such process
        return handle

    async def list(self) -> builtins.list[ProcessInfo]:
        """The background commands, running or ended."""
        call = _guest.list_processes_call(self._sandbox.id)
        return _guest.parse_processes(await self._sandbox._request(call))


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
        self.files = AsyncFiles(self)
        self.pty = AsyncPty(self)
        self.ports = AsyncPorts(self)

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
        snapshot_id: str | None = None,
        network: Mapping[str, object] | None = None,
        url: str | None = None,
        api_key: str | None = None,
    ) -> AsyncSandbox:
        """Boot a new sandbox and return once its agent answers (waits up to 300 s).

        ``timeout_s`` is its lifetime in seconds, ``memory_mib`` its memory in MiB;
        unset values take the server's defaults. ``metadata`` labels it for ``list``.
        With ``snapshot_id`` it is forked from that snapshot (see :meth:`snapshot`) and
        gets its image, vcpus and memory; asking for others raises SnapshotMismatch.
        Without ``network`` it has no network at all; ``network={"egress": "full"}`` or
        ``{"egress": "allowlist", "allow": ["203.0.113.7:443", "pypi.org:443"]}`` gives
        it an address (``info().ip_address``); private ranges and the host stay out of
        reach (docs/networking.md).

        >>> sb = await AsyncSandbox.create("default", timeout_s=600, metadata={"user": "ada"})
        """
        call = _calls.create_call(
            image, vcpus, memory_mib, timeout_s, metadata, env, snapshot_id, network
        )
        info = _calls.parse(SandboxInfo, await _send_once(call, url, api_key))
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
        call = _calls.list_call(state, metadata)
        return _calls.parse_list(await _send_once(call, url, api_key))

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

    async def pause(self) -> SandboxInfo:
        """Save the running sandbox to disk and free its CPU and memory (state ``paused``).

        Commands are refused (Conflict) until :meth:`resume`. Waits up to 360 s.

        >>> (await sb.pause()).state
        'paused'
        """
        return _calls.parse(SandboxInfo, await self._request(_calls.pause_call(self.id)))

    async def resume(self) -> SandboxInfo:
        """Restore the paused sandbox where it left off (state ``running``).

        >>> (await sb.resume()).state
        'running'
        """
        return _calls.parse(SandboxInfo, await self._request(_calls.resume_call(self.id)))

    async def snapshot(self) -> SnapshotInfo:
        """Save the running sandbox's memory and disk; it keeps running. Fork new
        sandboxes from it with ``create(snapshot_id=...)``; delete it with Snapshots.

        >>> fork = await AsyncSandbox.create(snapshot_id=(await sb.snapshot()).id)
        """
        return _calls.parse(SnapshotInfo, await self._request(_calls.snapshot_call(self.id)))

    async def get_host(self, port: int) -> str:
        """Where the guest's ``port`` answers, without the scheme (``HOST:PORT/PATH``, as
        E2B's ``get_host``); requests there need the API key. See ``sandbox.ports``.

        >>> url = f"http://{sb.get_host(8000)}/"
        """
        return _ports.host_of(self._config, self.id, port)

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
        return await _send(self._http(), self._config, call)

    @contextlib.asynccontextmanager
    async def _stream(self, call: Call) -> AsyncIterator[httpx.Response]:
        """The answer with its body not read yet; an error answer raises its class."""
        try:
            async with self._http().stream(**call.request_options()) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise _calls.error_from_response(response)
                yield response
        except httpx.TransportError as exc:
            raise _calls.transport_error(exc, self._config) from exc

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(**self._config.client_options())
        return self._client


class AsyncSnapshots:
    """The server's snapshots: list, inspect and delete them (take one with
    :meth:`AsyncSandbox.snapshot`). ``url`` and ``api_key`` as for :class:`AsyncSandbox`.

    >>> [s.id for s in await AsyncSnapshots.list(sandbox_id=sb.id)]
    """

    @staticmethod
    async def list(
        sandbox_id: str | None = None, *, url: str | None = None, api_key: str | None = None
    ) -> builtins.list[SnapshotInfo]:
        """Snapshots, oldest first; only those taken of ``sandbox_id`` when given."""
        call = _calls.list_snapshots_call(sandbox_id)
        return _calls.parse_snapshot_list(await _send_once(call, url, api_key))

    @staticmethod
    async def get(
        snapshot_id: str, *, url: str | None = None, api_key: str | None = None
    ) -> SnapshotInfo:
        """One snapshot (``size_bytes`` is the disk it takes); NotFound when unknown."""
        call = _calls.get_snapshot_call(snapshot_id)
        return _calls.parse(SnapshotInfo, await _send_once(call, url, api_key))

    @staticmethod
    async def delete(
        snapshot_id: str, *, url: str | None = None, api_key: str | None = None
    ) -> None:
        """Delete a snapshot and its files; Conflict while a live sandbox forked from it.

        >>> await AsyncSnapshots.delete(snap.id)
        """
        call = _calls.delete_snapshot_call(snapshot_id)
        _calls.raise_for_error(await _send_once(call, url, api_key))


async def _send_once(call: Call, url: str | None, api_key: str | None) -> httpx.Response:
    """One request on a client of its own (the answer is read before it closes)."""
    config = ClientConfig.resolve(url, api_key)
    async with httpx.AsyncClient(**config.client_options()) as client:
        return await _send(client, config, call)
