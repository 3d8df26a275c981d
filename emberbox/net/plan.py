"""What a networked sandbox gets (policy + addresses), and its record on disk.

The record (``<data_dir>/net/<sandbox id>.json``) is written before anything is made on
the host and removed after everything is gone, so that whatever a crash leaves behind
is found again: a paused sandbox's network is re-made from it on resume, a server that
re-attaches a sandbox learns from it what to tear down later, and the orphan sweep
removes the namespaces of records that no live sandbox owns.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emberbox.config import Settings
from emberbox.net.addresses import LINK_PREFIX, Slot, allocate
from emberbox.net.policy import EgressPolicy

RECORD_SUFFIX = ".json"


@dataclass(frozen=True)
class NetworkPlan:
    """A sandbox's network as it should be: egress policy, addresses, resolvers."""

    policy: EgressPolicy
    slot: Slot
    network_cidr: str
    dns: tuple[str, ...] = ()

    def guest_config(self) -> dict[str, Any]:
        """What the guest agent is told at hello (see emberbox/guest/netconf.py)."""
        return {
            "address": self.slot.guest,
            "prefix": LINK_PREFIX,
            "gateway": self.slot.gateway,
            "dns": list(self.dns),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": self.policy.to_json(),
            "guest": self.slot.guest,
            "network_cidr": self.network_cidr,
            "dns": list(self.dns),
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> NetworkPlan:
        return cls(
            EgressPolicy.from_json(raw["policy"]),
            Slot.of_guest(str(raw["guest"])),
            str(raw["network_cidr"]),
            tuple(str(d) for d in raw.get("dns", ())),
        )


def allocate_address(settings: Settings, used: list[str | None]) -> str:
    """A guest address of ``network_cidr`` that no address in ``used`` has."""
    return allocate(settings.network_cidr, used).guest


def plan_for(settings: Settings, policy: EgressPolicy, guest_address: str) -> NetworkPlan:
    """The plan of a sandbox with ``policy`` at ``guest_address`` (from allocate_address)."""
    dns = tuple(settings.network_dns)
    return NetworkPlan(policy, Slot.of_guest(guest_address), settings.network_cidr, dns)


def net_dir(data_dir: Path) -> Path:
    return data_dir / "net"


def record_path(directory: Path, sandbox_id: str) -> Path:
    return directory / f"{sandbox_id}{RECORD_SUFFIX}"


def save(directory: Path, sandbox_id: str, plan: NetworkPlan) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = record_path(directory, sandbox_id)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(plan.to_json(), indent=2))
    os.replace(tmp, path)


def load(directory: Path, sandbox_id: str) -> NetworkPlan | None:
    """The sandbox's recorded plan; None when it has none (or it cannot be read)."""
    try:
        return NetworkPlan.from_json(json.loads(record_path(directory, sandbox_id).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def forget(directory: Path, sandbox_id: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        record_path(directory, sandbox_id).unlink()


def recorded_ids(directory: Path) -> list[str]:
    if not directory.is_dir():
        return []
    return sorted(
        p.name.removesuffix(RECORD_SUFFIX)
        for p in directory.iterdir()
        if p.name.endswith(RECORD_SUFFIX) and not p.name.startswith(".")
    )
