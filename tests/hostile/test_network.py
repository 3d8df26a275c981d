"""Hostile guests on the network: with ``egress: full`` a guest still cannot reach the
cloud metadata address, private ranges, the host itself (the API port included), its
namespace's gateway or another sandbox; allowlisting a private address does not help.

Every target really listens (a namespace on this machine, the host, or another guest)
and is first reached from somewhere it is allowed, so each "unreachable" is the rules'
doing. A public target (TEST-NET-2, in a namespace here) is the control: the same guest
reaches it, so its network works. Nothing leaves the machine.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from emberbox.net.addresses import Slot, namespace_name
from emberbox.net.host import host_addresses
from tests.support.hostile import (
    Bystander,
    HostileCase,
    HostileServer,
    assert_cleaned_up,
)
from tests.support.network import (
    BANNER,
    PROBE,
    PUBLIC_TARGET,
    host_reaches,
    probe,
    reached,
    start_listener,
    target_namespace,
)

pytestmark = [pytest.mark.vm]

SERVER_ENV = {"EMBERBOX_NETWORK_CIDR": "10.216.0.0/16"}
METADATA = "169.254.169.254"
PRIVATE_10 = "10.66.0.10"
PRIVATE_192 = "192.168.77.10"
PORT = 8080
HOST_PORT = 18080  # a listener on every address of the host
GUEST_PORT = 9000


@dataclass(frozen=True)
class Targets:
    public: str
    forbidden: tuple[str, ...]


@pytest.fixture(scope="module")
def targets() -> Iterator[Targets]:
    """The public control and three forbidden targets, each listening on PORT (and 80)."""
    with contextlib.ExitStack() as stack:
        public = stack.enter_context(target_namespace(PUBLIC_TARGET, [PORT]))
        forbidden = tuple(
            stack.enter_context(target_namespace(address, [PORT, 80]))
            for address in (METADATA, PRIVATE_10, PRIVATE_192)
        )
        yield Targets(public, forbidden)


@contextlib.contextmanager
def networked(
    server: HostileServer, network: dict[str, object]
) -> Iterator[tuple[httpx.Client, str, str]]:
    """A sandbox with ``network``; killed afterwards, leaving nothing (network included)."""
    with server.client() as client:
        response = client.post("/v1/sandboxes", json={"network": network})
        assert response.status_code == 201, response.text
        sandbox_id, address = response.json()["id"], response.json()["ip_address"]
        try:
            yield client, sandbox_id, address
        finally:
            assert client.delete(f"/v1/sandboxes/{sandbox_id}").status_code == 204
            assert_cleaned_up(server, sandbox_id)
            assert not namespace_exists(sandbox_id)


def namespace_exists(sandbox_id: str) -> bool:
    with open("/proc/mounts", encoding="utf-8") as mounts:
        return any(f"/run/netns/{namespace_name(sandbox_id)} " in line for line in mounts)


def host_ipv4() -> list[str]:
    """The host's own non-loopback IPv4 addresses (sandboxes' veth ends excluded)."""
    return [
        a
        for a in host_addresses()
        if ipaddress.ip_address(a).version == 4 and not ipaddress.ip_address(a).is_loopback
    ]


def test_full_egress_cannot_reach_metadata_or_private_ranges(
    server: HostileServer, targets: Targets, bystander: Bystander, hostile_case: HostileCase
) -> None:
    """169.254.169.254, a 10.x and a 192.168.x target that listen are dropped; the public
    control passes."""
    with (
        hostile_case(
            "reach 169.254.169.254 / 10.x / 192.168.x (egress full)",
            "nftables in the sandbox's namespace",
        ) as case,
        networked(server, {"egress": "full"}) as (client, sandbox_id, _),
    ):
        wanted = [(targets.public, PORT)] + [(t, p) for t in targets.forbidden for p in (PORT, 80)]
        answers = probe(client, sandbox_id, wanted)
        assert reached(answers[0]), answers
        assert not any(reached(a) for a in answers[1:]), answers
        assert all("timed out" in a for a in answers[1:]), answers  # dropped, not refused
        bystander.check()
        case.outcome = f"public control reached; {len(answers) - 1} forbidden targets timed out"


def test_host_addresses_api_port_and_gateway_unreachable(
    server: HostileServer, targets: Targets, bystander: Bystander, hostile_case: HostileCase
) -> None:
    """The host's own addresses (a listener on all of them, and one on the API's port),
    the host end of the sandbox's veth and its namespace's gateway are all unreachable."""
    api_port = int(server.url.rsplit(":", 1)[1])
    own = host_ipv4()
    assert own, "the host has no non-loopback IPv4 address to test"
    with contextlib.ExitStack() as stack:
        everywhere = start_listener([], "0.0.0.0", [HOST_PORT])
        stack.callback(everywhere.stop)
        api_twin = start_listener([], own[0], [api_port])  # the API itself is on 127.0.0.1
        stack.callback(api_twin.stop)
        case = stack.enter_context(
            hostile_case(
                "reach the host (its addresses, API port, gateway)",
                "nftables: namespace + host input",
            )
        )
        client, sandbox_id, address = stack.enter_context(networked(server, {"egress": "full"}))
        slot = Slot.of_guest(address)
        in_ns = start_listener(
            ["ip", "netns", "exec", namespace_name(sandbox_id)], "0.0.0.0", [HOST_PORT]
        )
        stack.callback(in_ns.stop)
        wanted = [(a, HOST_PORT) for a in own] + [(own[0], api_port)]
        wanted += [(slot.host_veth, HOST_PORT), (slot.gateway, HOST_PORT)]
        for host, port in wanted[:-1]:  # the host reaches its own listeners
            assert host_reaches(host, port), (host, port)
        assert ns_reaches(namespace_name(sandbox_id), slot.gateway, HOST_PORT)
        answers = probe(client, sandbox_id, [(targets.public, PORT), *wanted])
        assert reached(answers[0]), answers
        assert not any(reached(a) for a in answers[1:]), list(zip(wanted, answers[1:], strict=True))
        bystander.check()
        case.outcome = f"{len(wanted)} host/gateway endpoints unreachable, control reached"


def test_two_sandboxes_cannot_reach_each_other(
    server: HostileServer, targets: Targets, bystander: Bystander, hostile_case: HostileCase
) -> None:
    """A guest listening on its address is reached by itself, never by another
    networked sandbox (either way)."""
    with contextlib.ExitStack() as stack:
        case = stack.enter_context(
            hostile_case("reach another sandbox", "nftables: namespace + host forward")
        )
        client, first, first_ip = stack.enter_context(networked(server, {"egress": "full"}))
        _, second, second_ip = stack.enter_context(networked(server, {"egress": "full"}))
        for sandbox_id in (first, second):
            listen = {"cmd": ["python3", "-c", _guest_listener(), str(GUEST_PORT)]}
            started = client.post(f"/v1/sandboxes/{sandbox_id}/processes", json=listen)
            assert started.status_code == 201, started.text
        assert reached(_wait_self_reach(client, first, first_ip))
        assert reached(_wait_self_reach(client, second, second_ip))
        across = probe(client, first, [(targets.public, PORT), (second_ip, GUEST_PORT)])
        back = probe(client, second, [(first_ip, GUEST_PORT)])
        assert reached(across[0]), across
        assert not reached(across[1]) and not reached(back[0]), (across, back)
        bystander.check()
        case.outcome = "each guest reaches itself and the control, not the other"


def test_allowlisted_private_addresses_stay_unreachable(
    server: HostileServer, targets: Targets, bystander: Bystander, hostile_case: HostileCase
) -> None:
    """Allowlisting the metadata address, private ranges and the host changes nothing;
    the allowlisted public target passes."""
    own = host_ipv4()
    allow = [f"{targets.public}:{PORT}", f"{METADATA}:80", PRIVATE_10, f"{PRIVATE_192}/24", *own]
    with (
        hostile_case(
            "allowlist private / metadata / host addresses", "always-deny rules before allow"
        ) as case,
        networked(server, {"egress": "allowlist", "allow": allow}) as (client, sandbox_id, _),
    ):
        wanted = [(targets.public, PORT), (METADATA, 80), (PRIVATE_10, PORT), (PRIVATE_192, PORT)]
        answers = probe(client, sandbox_id, wanted)
        assert reached(answers[0]), answers
        assert not any(reached(a) for a in answers[1:]), answers
        bystander.check()
        case.outcome = "only the public allowlisted target reached"


def _guest_listener() -> str:
    return (
        "import socket,sys\n"
        "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "s.bind(('0.0.0.0', int(sys.argv[1]))); s.listen(8)\n"
        "while True:\n"
        "    c,_=s.accept(); h,p=c.getsockname()[:2]\n"
        f"    c.sendall(f'{BANNER} {{h}}:{{p}}\\n'.encode()); c.close()\n"
    )


def _wait_self_reach(client: httpx.Client, sandbox_id: str, address: str) -> str:
    """The guest connects to its own address (retrying while its listener starts)."""
    answer = ""
    for _ in range(10):
        [answer] = probe(client, sandbox_id, [(address, GUEST_PORT)])
        if reached(answer):
            break
    return answer


def ns_reaches(namespace: str, host: str, port: int) -> bool:
    """True when a process inside ``namespace`` gets the banner from ``host:port``."""
    argv = [
        "ip",
        "netns",
        "exec",
        namespace,
        sys.executable,
        "-c",
        PROBE,
        json.dumps([[host, port]]),
    ]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return reached(json.loads(out)[0])
