"""A sandbox's network, as :class:`~emberbox.service.vm.machine.SandboxVM` wires it: its own
namespace, TAP and egress rules on the host (:mod:`emberbox.net.host`), and the guest's
NIC set up through the agent. See docs/networking.md."""

from __future__ import annotations

import asyncio

from emberbox.agent_client.client import AgentClient
from emberbox.config import Settings
from emberbox.errors import AgentError, AgentRequestFailed, InvalidRequest
from emberbox.net import host as nethost
from emberbox.net import plan as netplan
from emberbox.net.plan import NetworkPlan
from emberbox.vmm.base import Driver


async def network_up(
    settings: Settings,
    driver: Driver,
    sandbox_id: str,
    plan: NetworkPlan | None,
    *,
    keep_record: bool = False,
) -> nethost.NetNamespace | None:
    """The sandbox's namespace, TAP and rules (None without a plan)."""
    if plan is None:
        return None
    if driver.name != "qemu":
        raise InvalidRequest(
            f"network is not supported with the {driver.name} driver; use QEMU "
            "(EMBERBOX_VMM=qemu) for sandboxes with network",
            field="network",
        )
    return await asyncio.to_thread(
        nethost.setup,
        plan,
        sandbox_id,
        netplan.net_dir(settings.data_dir),
        set_ip_forward=settings.network_set_ip_forward,
        keep_record=keep_record,
    )


async def network_down(ns: nethost.NetNamespace | None, *, keep_record: bool = False) -> None:
    """Remove ``ns`` (after its VMM is gone), even when the caller is cancelled."""
    if ns is not None:
        await asyncio.shield(asyncio.to_thread(ns.remove, keep_record=keep_record))


async def configure_guest(agent: AgentClient, plan: NetworkPlan | None) -> None:
    """Tell the guest its address (or to take its NIC down, without a plan)."""
    try:
        await agent.configure_network(plan.guest_config() if plan else None)
    except TimeoutError as exc:
        raise AgentError("the agent did not answer the network set-up") from exc
    except AgentRequestFailed as exc:  # the guest's fault, not the caller's (no 400)
        raise AgentError(f"guest network set-up failed: {exc.message}") from exc
