"""Start means ready: boot a VM, connect to its agent, and return only after the handshake.

Never trust a single boot: under software emulation a guest occasionally hangs early,
so each attempt gets ``timeout_s`` and a hung or crashed attempt is killed and retried,
up to ``attempts`` times. The last failure is raised with the console's tail.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from emberbox.agent_client.client import AgentClient, HelloInfo
from emberbox.errors import AgentError, BootTimeout, VMMCrashed, VMMError
from emberbox.vmm.base import VM

log = logging.getLogger("emberbox.boot")


@dataclass(frozen=True)
class Ready:
    vm: VM
    agent: AgentClient
    hello: HelloInfo
    boot_ms: float = 0.0  # the successful attempt's start to agent hello


async def connect_agent(
    vm: VM, *, timeout_s: float, hostname: str, sandbox_id: str
) -> tuple[AgentClient, HelloInfo]:
    """Open the agent stream and handshake, failing fast if the VMM process dies."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    reader, writer = await vm.open_agent_stream(timeout_s)
    agent = AgentClient(reader, writer)
    handshake = asyncio.ensure_future(
        agent.handshake(
            timeout_s=max(0.1, deadline - loop.time()), hostname=hostname, sandbox_id=sandbox_id
        )
    )
    died = asyncio.ensure_future(vm.wait())
    try:
        done, _ = await asyncio.wait({handshake, died}, return_when=asyncio.FIRST_COMPLETED)
        if handshake in done:
            return agent, handshake.result()
        raise VMMCrashed("the VMM exited during boot", vm.console_tail())
    except BaseException:
        await agent.aclose()
        raise
    finally:
        for task in (handshake, died):
            task.cancel()
        await asyncio.gather(handshake, died, return_exceptions=True)


async def boot_until_ready(
    start: Callable[[], Awaitable[VM]],
    *,
    timeout_s: float,
    attempts: int,
    hostname: str,
    sandbox_id: str,
) -> Ready:
    """Start a VM with ``start`` until one answers the handshake (the boot watchdog)."""
    last: VMMError | None = None
    for attempt in range(1, attempts + 1):
        vm = await start()
        started = time.perf_counter()
        try:
            agent, hello = await connect_agent(
                vm, timeout_s=timeout_s, hostname=hostname, sandbox_id=sandbox_id
            )
            return Ready(vm, agent, hello, (time.perf_counter() - started) * 1000)
        except (VMMError, AgentError) as exc:
            tail = vm.console_tail()
            last = exc if isinstance(exc, VMMError) else VMMCrashed(str(exc), tail)
            last.console_tail = last.console_tail or tail
            log.warning(
                "boot attempt %d/%d of %s failed: %s", attempt, attempts, sandbox_id, exc.message
            )
            await vm.kill()
        except BaseException:
            await vm.kill()
            raise
    assert last is not None
    if isinstance(last, BootTimeout):
        raise BootTimeout(
            f"no agent handshake after {attempts} boot attempt(s) of {timeout_s:g} s each",
            last.console_tail,
        )
    raise last
