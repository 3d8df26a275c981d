"""The HTTP client of one Firecracker API socket (what :mod:`~emberbox.vmm.qemu.qmp` is to QEMU).

Payloads come from :mod:`~emberbox.vmm.firecracker.api`; this module sends them and turns what
goes wrong into the exception tree: a refusal into the VMMError of :func:`fc_api.api_error`,
a broken connection into VMMCrashed once the process is gone, and a snapshot that does
not load into SnapshotCorrupt naming its state file.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

import httpx

from emberbox.errors import SnapshotCorrupt, VMMCrashed, VMMError
from emberbox.vmm.firecracker import api as fc_api
from emberbox.vmm.firecracker.api import ApiRequest
from emberbox.vmm.firecracker.process import VMMProcess, wait_exit

LOAD_EXIT_GRACE_S = 2.0  # a VMM whose load connection broke gets this long to finish dying


class ApiClient:
    """Requests on ``socket`` to the Firecracker ``process``; errors carry the console tail."""

    def __init__(
        self,
        socket: Path,
        process: VMMProcess,
        console_tail: Callable[[], str],
        *,
        timeout_s: float,
    ) -> None:
        self._socket = socket
        self._process = process
        self._console_tail = console_tail
        self._client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(socket)),
            base_url="http://localhost",
            timeout=timeout_s,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def request(self, req: ApiRequest, timeout_s: float | None = None) -> None:
        """Send one API call; a refusal or a dead process becomes a VMMError."""
        timeout = httpx.USE_CLIENT_DEFAULT if timeout_s is None else timeout_s
        try:
            resp = await self._client.request(req.method, req.path, json=req.body, timeout=timeout)
        except httpx.TransportError as exc:
            raise self._failure(f"Firecracker API {req.method} {req.path} failed: {exc}") from exc
        if not resp.is_success:
            raise fc_api.api_error(resp.status_code, resp.content, req, self._console_tail())

    async def load_snapshot(self, req: ApiRequest, state: Path, timeout_s: float) -> None:
        """Send the snapshot load ``req``; SnapshotCorrupt naming ``state`` (the host's
        ``vmstate``) when Firecracker refuses the snapshot or dies loading it.

        A load that fails with the process still alive and silent (a timeout) stays a
        VMMError: nothing says the snapshot is at fault.
        """
        try:
            await self.request(req, timeout_s=timeout_s)
        except VMMError as exc:
            if "fault" in exc.details:  # Firecracker answered, refusing the snapshot
                reason = str(exc.details["fault"])
            elif await wait_exit(self._process, LOAD_EXIT_GRACE_S):
                reason = f"Firecracker exited (status {self._process.poll()})"
            else:
                raise
            raise SnapshotCorrupt(
                f"could not load snapshot {state}: {reason}", self._console_tail(), file=str(state)
            ) from exc

    async def wait_ready(self, timeout_s: float) -> None:
        """Return once the API socket accepts connections."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            if self._process.poll() is not None:
                raise self._failure("")
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_unix_connection(self._socket)
                writer.close()
                await writer.wait_closed()
                return
            if loop.time() > deadline:
                raise VMMError(
                    f"no Firecracker API socket at {self._socket} after {timeout_s:g}s",
                    self._console_tail(),
                )
            await asyncio.sleep(0.01)

    def _failure(self, message: str) -> VMMError:
        status = self._process.poll()
        if status is not None:
            return VMMCrashed(f"Firecracker exited (status {status})", self._console_tail())
        return VMMError(message, self._console_tail())
