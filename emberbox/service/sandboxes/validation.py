"""Checks of what callers ask the manager for: shapes, env, metadata, commands (an
:class:`~emberbox.agent_client.spec.ExecSpec` or ``SpawnSpec``), networks."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import anyio
import anyio.to_thread

from emberbox import errors
from emberbox.agent_client.spec import CommandSpec
from emberbox.config import Settings
from emberbox.guest import protocol
from emberbox.net.policy import EgressPolicy, parse_policy

# The guest kernel and agent do not boot in less (80 MiB: OOM; 64 MiB: panic); the wire
# bound (emberbox.models.SandboxCreate.memory_mib) is the same.
MIN_MEMORY_MIB = 128


@dataclass(frozen=True)
class Spec:
    """A validated create request."""

    image: str
    vcpus: int
    memory_mib: int
    timeout_s: int
    metadata: dict[str, str]
    env: dict[str, str]


def check_range(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise errors.InvalidRequest(
            f"{name} must be an integer from {low} to {high} (got {value!r})",
            field=name,
        )


def validate_mapping(values: object, what: str) -> dict[str, str]:
    if not isinstance(values, Mapping) or not all(
        isinstance(k, str) and k and isinstance(v, str) for k, v in values.items()
    ):
        raise errors.InvalidRequest(f"{what} must map non-empty strings to strings", field=what)
    return dict(values)


def validate_env(env: object, what: str) -> dict[str, str]:
    checked = validate_mapping(env, what)
    for key, value in checked.items():
        if "=" in key or "\0" in key or "\0" in value:
            raise errors.InvalidRequest(f"{what}: invalid variable {key!r}", field=what)
    return checked


def validate_spec(
    settings: Settings,
    image: str | None,
    vcpus: int | None,
    memory_mib: int | None,
    timeout_s: int | None,
    metadata: dict[str, str] | None,
    env: dict[str, str] | None,
) -> Spec:
    spec = Spec(
        image=settings.default_image if image is None else image,
        vcpus=settings.default_vcpus if vcpus is None else vcpus,
        memory_mib=settings.default_memory_mib if memory_mib is None else memory_mib,
        timeout_s=settings.default_timeout_s if timeout_s is None else timeout_s,
        metadata=validate_mapping(metadata or {}, "metadata"),
        env=validate_env(env or {}, "env"),
    )
    if not isinstance(spec.image, str) or not spec.image:
        raise errors.InvalidRequest("image must be a non-empty name", field="image")
    check_range("vcpus", spec.vcpus, 1, settings.max_vcpus)
    check_range("memory_mib", spec.memory_mib, MIN_MEMORY_MIB, settings.max_memory_mib)
    check_range("timeout_s", spec.timeout_s, 1, settings.max_timeout_s)
    return spec


def validate_command(spec: CommandSpec) -> None:
    """An exec's or a spawn's command, working directory, env and timeout, as the
    guest takes them (InvalidRequest naming the field otherwise)."""
    cmd = spec.cmd
    if isinstance(cmd, str):
        ok = bool(cmd.strip()) and "\0" not in cmd
    elif isinstance(cmd, tuple):
        ok = bool(cmd) and all(isinstance(a, str) and "\0" not in a for a in cmd) and bool(cmd[0])
    else:
        ok = False
    if not ok:
        raise errors.InvalidRequest(
            "cmd must be a non-empty string or a non-empty list of strings", field="cmd"
        )
    if spec.cwd is not None and (not spec.cwd or "\0" in spec.cwd):
        raise errors.InvalidRequest(f"invalid cwd {spec.cwd!r}", field="cwd")
    validate_env(spec.env, "env")
    if spec.timeout_s is not None and not spec.timeout_s > 0:
        raise errors.InvalidRequest(f"timeout_s must be positive (got {spec.timeout_s})")
    check_frame(spec)


# What a request frame holds besides the command's fields (op, framing): kept free.
FRAME_MARGIN_BYTES = 4096


def check_frame(spec: CommandSpec) -> None:
    """PayloadTooLarge (413) when the command's argv, env and stdin, as sent to the
    guest agent, would not fit in one frame (``protocol.MAX_PAYLOAD``): checked again
    once the sandbox's env is merged in, never left to the agent link to fail (a 500)."""
    limit = protocol.MAX_PAYLOAD - FRAME_MARGIN_BYTES
    size = len(json.dumps(spec.wire(), separators=(",", ":")).encode("utf-8"))
    if size > limit:
        raise errors.PayloadTooLarge(
            f"the command's argv, env and stdin take {size} bytes as sent to the guest "
            f"agent; at most {limit} fit in one request (pass bulk data as a file)",
            quota="agent_frame_bytes",
            limit=limit,
        )


# Host names in allow lists are resolved in threads of their own, few at a time and with
# a deadline, so a resolver that never answers cannot take the threads the store needs.
RESOLVE_TIMEOUT_S = 5.0
_RESOLVERS = anyio.CapacityLimiter(4)


async def resolve_network(settings: Settings, network: Mapping[str, object]) -> EgressPolicy | None:
    """:func:`validate_network` off the event loop, within RESOLVE_TIMEOUT_S."""
    try:
        with anyio.fail_after(RESOLVE_TIMEOUT_S):
            return await anyio.to_thread.run_sync(
                validate_network, settings, network, limiter=_RESOLVERS, abandon_on_cancel=True
            )
    except TimeoutError:
        raise errors.InvalidRequest(
            f"the host names in network.allow did not resolve within {RESOLVE_TIMEOUT_S:g} s; "
            "give addresses instead",
            field="network",
        ) from None


def validate_network(
    settings: Settings, network: Mapping[str, object] | None
) -> EgressPolicy | None:
    """The egress policy a create asks for; None: no network (the default). Host names
    in ``allow`` are resolved here, once (blocking: call from a worker thread)."""
    if network is not None and settings.vmm == "firecracker":
        raise errors.InvalidRequest(
            "network is not supported with the Firecracker driver (EMBERBOX_VMM=firecracker); "
            "use QEMU for sandboxes with network",
            field="network",
        )
    return parse_policy(network, max_allow=settings.network_max_allow)
