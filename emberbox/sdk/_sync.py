"""The blocking client: :class:`Sandbox`. Mirrors :mod:`emberbox.sdk._async` call for call."""

from __future__ import annotations

import builtins
import contextlib
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Literal, overload

import httpx

from emberbox import errors
from emberbox.models import ProcessStarted
from emberbox.sdk import _calls, _guest, _ports
from emberbox.sdk._calls import Call, ClientConfig, CommandResult, SandboxInfo, SnapshotInfo
from emberbox.sdk._guest import OutputCollector, OutputHandler, ProcessInfo
from emberbox.sdk._ports import Ports
from emberbox.sdk._sync_guest import CommandHandle, Files, Pty


def _send(client: httpx.Client, config: ClientConfig, call: Call) -> httpx.Response:
    try:
        return client.request(**call.request_options())
    except httpx.TransportError as exc:
        raise _calls.transport_error(exc, config) from exc


class Commands:
    """``sandbox.commands``: run commands in the sandbox."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    @overload
    def run(
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
    def run(
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
    ) -> CommandHandle: ...

    def run(
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
    ) -> CommandResult | CommandHandle:
        """Run a command to completion and return its exit code and output.

        A string runs through ``/bin/sh -c``; a list is an argv. ``timeout_s`` (seconds)
        kills the command when it runs longer (the result then has ``timed_out=True``);
        without it the server's default applies. A non-zero exit code is not an error.
        ``on_stdout``/``on_stderr`` get the output as text while it runs.

        With ``background=True`` it returns at once a :class:`CommandHandle` (``wait``,
        ``kill``, ``send_stdin``); the command keeps running across other calls, and
        ``timeout_s`` defaults to none.

        >>> sb.commands.run("python3 -c 'print(6*7)'").stdout
        '42\\n'
        >>> sb.commands.run("for i in 1 2 3; do echo $i; sleep 1; done", on_stdout=print)
        """
        sandbox_id = self._sandbox.id
        if background:
            call = _guest.spawn_call(sandbox_id, cmd, env, cwd, timeout_s)
            pid = _calls.parse(ProcessStarted, self._sandbox._request(call)).pid
            handle = CommandHandle(self._sandbox, pid, on_stdout=on_stdout, on_stderr=on_stderr)
            if stdin is not None:
                handle.send_stdin(stdin)
            return handle
        if on_stdout is None and on_stderr is None:
            call = _calls.run_call(sandbox_id, cmd, env, cwd, timeout_s, stdin)
            return _calls.parse(CommandResult, self._sandbox._request(call))
        collector = OutputCollector(on_stdout, on_stderr)
        call = _calls.run_call(sandbox_id, cmd, env, cwd, timeout_s, stdin, stream=True)
        with self._sandbox._stream(call) as response:
            for line in response.iter_lines():
                if line and (target := collector.feed(_guest.parse_event(line))):
                    target[0](target[1])
        return collector.result()

    def connect(
        self,
        pid: int,
        *,
        on_stdout: OutputHandler | None = None,
        on_stderr: OutputHandler | None = None,
    ) -> CommandHandle:
        """A handle on a background command started earlier (see :meth:`list`)."""
        handle = CommandHandle(self._sandbox, pid, on_stdout=on_stdout, on_stderr=on_stderr)
        handle.status()  # NotFound when there is no such process
        return handle

    def list(self) -> builtins.list[ProcessInfo]:
        """The background commands, running or ended."""
        call = _guest.list_processes_call(self._sandbox.id)
        return _guest.parse_processes(self._sandbox._request(call))


class Sandbox:
    """A microVM sandbox on an emberbox server (blocking client).

    >>> with Sandbox.create() as sb:
    ...     print(sb.commands.run("uname -r").stdout)

    The server is ``url`` or ``$EMBERBOX_URL`` (default ``http://127.0.0.1:8080``); the
    key is ``api_key`` or ``$EMBERBOX_API_KEY``. Leaving a ``with`` block kills it.
    """

    def __init__(
        self, sandbox_id: str, *, url: str | None = None, api_key: str | None = None
    ) -> None:
        """A handle on an existing sandbox, without contacting the server (see connect)."""
        self.id = sandbox_id
        self._config = ClientConfig.resolve(url, api_key)
        self._client: httpx.Client | None = None  # opened on first use, again after close()
        self.commands = Commands(self)
        self.files = Files(self)
        self.pty = Pty(self)
        self.ports = Ports(self)

    def __repr__(self) -> str:
        return f"Sandbox(id={self.id!r}, url={self._config.url!r})"

    @classmethod
    def create(
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
    ) -> Sandbox:
        """Boot a new sandbox and return once its agent answers (waits up to 300 s).

        ``timeout_s`` is its lifetime in seconds, ``memory_mib`` its memory in MiB;
        unset values take the server's defaults. ``metadata`` labels it for ``list``.
        With ``snapshot_id`` it is forked from that snapshot (see :meth:`snapshot`) and
        gets its image, vcpus and memory; asking for others raises SnapshotMismatch.
        Without ``network`` it has no network at all; ``network={"egress": "full"}`` or
        ``{"egress": "allowlist", "allow": ["203.0.113.7:443", "pypi.org:443"]}`` gives
        it an address (``info().ip_address``); private ranges and the host stay out of
        reach (docs/networking.md).

        >>> sb = Sandbox.create("default", timeout_s=600, metadata={"user": "ada"})
        """
        call = _calls.create_call(
            image, vcpus, memory_mib, timeout_s, metadata, env, snapshot_id, network
        )
        info = _calls.parse(SandboxInfo, _send_once(call, url, api_key))
        return cls(info.id, url=url, api_key=api_key)

    @classmethod
    def connect(
        cls, sandbox_id: str, *, url: str | None = None, api_key: str | None = None
    ) -> Sandbox:
        """A handle on an existing sandbox; raises NotFound when the server has none.

        >>> sb = Sandbox.connect("sb-1234")
        """
        sandbox = cls(sandbox_id, url=url, api_key=api_key)
        try:
            sandbox.info()
        except BaseException:
            sandbox.close()
            raise
        return sandbox

    @classmethod
    def list(
        cls,
        *,
        state: str | None = None,
        metadata: Mapping[str, str] | None = None,
        url: str | None = None,
        api_key: str | None = None,
    ) -> builtins.list[SandboxInfo]:
        """Sandboxes on the server, optionally only in ``state`` and with all ``metadata``.

        >>> [s.id for s in Sandbox.list(state="running", metadata={"user": "ada"})]
        """
        return _calls.parse_list(_send_once(_calls.list_call(state, metadata), url, api_key))

    def info(self) -> SandboxInfo:
        """What the server says about this sandbox now (state, expires_at, ip_address ...)."""
        return _calls.parse(SandboxInfo, self._request(_calls.get_call(self.id)))

    def get_info(self) -> SandboxInfo:
        """Same as :meth:`info`."""
        return self.info()

    def set_timeout(self, timeout_s: int) -> SandboxInfo:
        """Kill the sandbox ``timeout_s`` seconds from now (instead of its old deadline).

        >>> sb.set_timeout(3600).expires_at
        """
        return _calls.parse(SandboxInfo, self._request(_calls.timeout_call(self.id, timeout_s)))

    def pause(self) -> SandboxInfo:
        """Save the running sandbox to disk and free its CPU and memory (state ``paused``).

        Commands are refused (Conflict) until :meth:`resume`. Waits up to 360 s.

        >>> sb.pause().state
        'paused'
        """
        return _calls.parse(SandboxInfo, self._request(_calls.pause_call(self.id)))

    def resume(self) -> SandboxInfo:
        """Restore the paused sandbox where it left off (state ``running``).

        >>> sb.resume().state
        'running'
        """
        return _calls.parse(SandboxInfo, self._request(_calls.resume_call(self.id)))

    def snapshot(self) -> SnapshotInfo:
        """Save the running sandbox's memory and disk; it keeps running. Fork new
        sandboxes from it with ``create(snapshot_id=...)``; delete it with Snapshots.

        >>> fork = Sandbox.create(snapshot_id=sb.snapshot().id)
        """
        return _calls.parse(SnapshotInfo, self._request(_calls.snapshot_call(self.id)))

    def get_host(self, port: int) -> str:
        """Where the guest's ``port`` answers, without the scheme (``HOST:PORT/PATH``, as
        E2B's ``get_host``); requests there need the API key. See ``sandbox.ports``.

        >>> url = f"http://{sb.get_host(8000)}/"
        """
        return _ports.host_of(self._config, self.id, port)

    def kill(self) -> None:
        """Stop the sandbox and free its resources. Killing it twice is fine."""
        _calls.raise_for_error(self._request(_calls.kill_call(self.id)))

    def close(self) -> None:
        """Release the HTTP connection (the sandbox keeps running)."""
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.kill()
        except errors.EmberboxError:
            if exc is None:
                raise  # else let the error from the block through, not this one
        finally:
            self.close()

    def _request(self, call: Call) -> httpx.Response:
        return _send(self._http(), self._config, call)

    @contextlib.contextmanager
    def _stream(self, call: Call) -> Iterator[httpx.Response]:
        """The answer with its body not read yet; an error answer raises its class."""
        try:
            with self._http().stream(**call.request_options()) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _calls.error_from_response(response)
                yield response
        except httpx.TransportError as exc:
            raise _calls.transport_error(exc, self._config) from exc

    def _http(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(**self._config.client_options())
        return self._client


class Snapshots:
    """The server's snapshots: list, inspect and delete them (take one with
    :meth:`Sandbox.snapshot`). ``url`` and ``api_key`` as for :class:`Sandbox`.

    >>> [s.id for s in Snapshots.list(sandbox_id=sb.id)]
    """

    @staticmethod
    def list(
        sandbox_id: str | None = None, *, url: str | None = None, api_key: str | None = None
    ) -> builtins.list[SnapshotInfo]:
        """Snapshots, oldest first; only those taken of ``sandbox_id`` when given."""
        call = _calls.list_snapshots_call(sandbox_id)
        return _calls.parse_snapshot_list(_send_once(call, url, api_key))

    @staticmethod
    def get(
        snapshot_id: str, *, url: str | None = None, api_key: str | None = None
    ) -> SnapshotInfo:
        """One snapshot (``size_bytes`` is the disk it takes); NotFound when unknown."""
        call = _calls.get_snapshot_call(snapshot_id)
        return _calls.parse(SnapshotInfo, _send_once(call, url, api_key))

    @staticmethod
    def delete(snapshot_id: str, *, url: str | None = None, api_key: str | None = None) -> None:
        """Delete a snapshot and its files; Conflict while a live sandbox forked from it.

        >>> Snapshots.delete(snap.id)
        """
        call = _calls.delete_snapshot_call(snapshot_id)
        _calls.raise_for_error(_send_once(call, url, api_key))


def _send_once(call: Call, url: str | None, api_key: str | None) -> httpx.Response:
    """One request on a client of its own (the answer is read before it closes)."""
    config = ClientConfig.resolve(url, api_key)
    with httpx.Client(**config.client_options()) as client:
        return _send(client, config, call)
