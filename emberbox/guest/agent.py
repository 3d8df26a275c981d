"""The emberbox guest agent: PID 1 of a sandbox VM, running commands for the host.

Standard library only. In the guest the whole package is installed as
``/opt/emberbox/emberbox_guest/`` and started by the initramfs as PID 1 with
``python3 -m emberbox_guest`` (see ``emberbox/images/initramfs.py``), so it also does
the few duties of an init: mount the API file systems (cgroup2 included), reap every
child (orphans included) and power the machine off on request. On the host (tests) it
runs as an ordinary process with ``--listen unix:PATH`` and touches nothing global: the
clock, hostname, entropy pool and cgroups are used only when it is PID 1.

Pieces: :class:`Agent` (requests, dispatched on the table of ops) and :func:`main`
here; ``system`` (PID 1's set-up at boot, and what a hello changes), ``transports``
(serving the agent over a unix socket, vsock or virtio-serial), and the modules the
table dispatches to: ``commands`` (exec), ``processes`` (spawn and friends), ``files``,
``archive`` (tar), ``ports`` (TCP to a guest port), over ``channel`` (one byte stream
to the host).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import signal
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

from . import archive, cgroups, commands, common, files, ports, processes, protocol, system, warm
from .channel import Call
from .protocol import Op
from .transports import Server, choose_transport

AGENT_VERSION = "0.1.0"
PROTOCOL = protocol.PROTOCOL_VERSION

Handler = Callable[[dict[str, Any], Call], Awaitable[dict[str, Any]]]
log = common.log


class Agent:
    """Answers requests and serves the chosen transport until shut down."""

    # ops that read STDIN frames
    stdin_ops = frozenset({Op.WRITE_STDIN, Op.WRITE, Op.TAR_IN, Op.CONNECT})

    def __init__(self, init: system.Init | None, started: float) -> None:
        self._init = init
        self._started = started  # time.monotonic() when the agent process started
        self._system = system.GuestSystem(enabled=init is not None)
        self._reaper = commands.Reaper()
        self._cgroups = cgroups.Cgroups(enabled=init is not None)
        self._processes = processes.ProcessTable(self._reaper, self._cgroups)
        self._warm = warm.WarmRuntimes(self._reaper, self._cgroups)
        self._stop = asyncio.Event()
        table = self._processes
        self._ops: dict[Op, Handler] = {
            Op.HELLO: self._hello,
            Op.PING: _ok,
            Op.SHUTDOWN: _ok,  # the session powers off once the answer is sent
            Op.EXEC: self._exec,
            Op.SPAWN: table.spawn,
            Op.ATTACH: table.attach,
            Op.WRITE_STDIN: table.write_stdin,
            Op.SIGNAL: table.signal,
            Op.RESIZE: table.resize,
            Op.WAIT: table.wait,
            Op.PS: table.ps,
            Op.FORGET: table.forget,
            Op.STAT: files.stat,
            Op.LIST: files.list_dir,
            Op.READ: files.read,
            Op.WRITE: files.write,
            Op.MKDIR: files.make_dir,
            Op.REMOVE: files.remove,
            Op.RENAME: files.rename,
            Op.TAR_OUT: archive.tar_out,
            Op.TAR_IN: archive.tar_in,
            Op.CONNECT: ports.connect,
            Op.WARM: self._warm.warm,
            Op.RUN: self._warm.run,
        }

    async def run(self, transport: str) -> int:
        loop = asyncio.get_running_loop()
        self._reaper.install(loop)
        if self._init is None:  # tests stop us with SIGTERM: kill what we spawned first
            loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        log(f"started: version {AGENT_VERSION}, pid {os.getpid()}, transport {transport}")
        ready = {"event": "ready", "agent_version": AGENT_VERSION, "protocol": PROTOCOL}
        server = Server(self, ready, restart=self._init is not None)
        serve = asyncio.create_task(server.serve_forever(transport))
        stop = asyncio.create_task(self._stop.wait())
        await asyncio.wait([serve, stop], return_when=asyncio.FIRST_COMPLETED)
        for task in (serve, stop):
            task.cancel()
        await asyncio.gather(serve, stop, return_exceptions=True)
        await self._processes.aclose()
        self._warm.close()
        failed = not serve.cancelled() and serve.exception() is not None
        if failed:
            log(f"serving failed: {serve.exception()!r}")
        return 1 if failed else 0

    async def handle(self, req: dict[str, Any], call: Call) -> dict[str, Any]:
        """The answer to one request; its data frames go through `call` as they come."""
        return await self._ops[parse_op(req.get("op"))](req, call)

    async def _exec(self, req: dict[str, Any], call: Call) -> dict[str, Any]:
        runner = commands.ExecRunner(self._reaper, self._cgroups, call.congested)
        return await runner.run(req, call.emit)

    def shutdown(self) -> None:
        if self._init is not None:
            self._init.power_off()  # returns only if the kernel refused
        else:
            self._stop.set()

    async def _hello(self, req: dict[str, Any], _call: Call) -> dict[str, Any]:
        warnings = self._system.configure(req)
        return {
            "ok": True,
            "protocol": PROTOCOL,
            "agent_version": AGENT_VERSION,
            "features": list(protocol.FEATURES),
            # From the monotonic clock, so that it follows the clock we may just have set.
            "boot_time": time.time() - (time.monotonic() - self._started),
            "kernel": platform.release(),
            "pid": os.getpid(),
            "warnings": warnings,
        }


def parse_op(value: object) -> Op:
    """The request's op; BadRequest for anything that is not one of `Op`."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return Op(value)
    raise common.BadRequest(f"unknown op {value!r}")


async def _ok(_req: dict[str, Any], _call: Call) -> dict[str, Any]:
    return {"ok": True}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="emberbox-agent")
    parser.add_argument("--listen", help="unix:PATH (host-side tests)")
    args = parser.parse_args(argv)
    if args.listen and not args.listen.startswith("unix:"):
        parser.error("--listen takes unix:PATH")
    started = time.monotonic()
    transport = choose_transport(args.listen)
    init = system.boot() if os.getpid() == 1 else None
    while True:
        try:
            code = asyncio.run(Agent(init, started).run(transport))
        except BaseException:  # as PID 1, exiting would panic the kernel
            if init is None:
                raise
            log(f"agent crashed, restarting: {traceback.format_exc()}")
            code = 1
        if init is None:
            return code
        time.sleep(1.0)
