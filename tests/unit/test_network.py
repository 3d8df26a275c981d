"""Networking's pure parts: allow-entry parsing, address slots, the nftables text, the
plan record, the QEMU NIC arguments and the guest's ioctl structures (no VM, no root)."""

from __future__ import annotations

import ipaddress
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from emberbox import errors
from emberbox.config import Settings
from emberbox.guest import netconf
from emberbox.net import plan as netplan
from emberbox.net.addresses import Slot, allocate, host_veth_name, namespace_name
from emberbox.net.policy import AllowRule, EgressPolicy, parse_entry, parse_policy
from emberbox.net.rules import host_ruleset, namespace_ruleset
from emberbox.service.sandboxes import validation
from emberbox.service.sandboxes.validation import validate_network
from emberbox.vmm.base import BootFiles, VMConfig
from emberbox.vmm.qemu.argv import network_args


def fake_resolver(host: str) -> list[str]:
    if host == "example.test":
        return ["203.0.113.5", "203.0.113.6"]
    raise OSError("no such host")


def parse(network: dict[str, object] | None) -> EgressPolicy | None:
    return parse_policy(network, max_allow=8, resolve=fake_resolver)


# --- policy ---------------------------------------------------------------------------------


def test_no_network_unless_asked() -> None:
    """None and egress none mean no network at all."""
    assert parse(None) is None
    assert parse({"egress": "none"}) is None
    assert parse({}) is None


@pytest.mark.parametrize(
    ("entry", "network", "port"),
    [
        ("1.2.3.4", "1.2.3.4/32", None),
        ("1.2.3.0/24", "1.2.3.0/24", None),
        ("1.2.3.4:443", "1.2.3.4/32", 443),
        ("1.2.3.9/24:53", "1.2.3.0/24", 53),
    ],
)
def test_allow_entries_of_addresses(entry: str, network: str, port: int | None) -> None:
    """IP, CIDR, IP:port and CIDR:port parse to one rule each."""
    [rule] = parse_entry(entry, fake_resolver)
    assert (str(rule.network), rule.port, rule.entry) == (network, port, entry)


def test_host_names_resolve_once_to_every_address() -> None:
    """host and host:port give one /32 rule per IPv4 address the name has now."""
    rules = parse_entry("example.test:443", fake_resolver)
    assert [(str(r.network), r.port) for r in rules] == [
        ("203.0.113.5/32", 443),
        ("203.0.113.6/32", 443),
    ]
    assert [r.port for r in parse_entry("example.test", fake_resolver)] == [None, None]


@pytest.mark.parametrize(
    "entry",
    ["", "1.2.3.4:0", "1.2.3.4:70000", "1.2.3.4:x", "::1", "[::1]:80", "2001:db8::/32",
     "10.0.0.0/33", "1.2.3", "bad host", "-bad.test", "unknown.test", "a/b"],
)  # fmt: skip
def test_bad_entries_are_refused_by_name(entry: str) -> None:
    """Every malformed, IPv6 or unresolvable entry is an InvalidRequest naming it."""
    with pytest.raises(errors.InvalidRequest) as caught:
        parse({"egress": "allowlist", "allow": [entry]})
    assert repr(entry) in caught.value.message


def test_policy_shape_errors() -> None:
    """Unknown egress, unknown fields, allow without allowlist, too many entries: 400."""
    cases: list[dict[str, object]] = [
        {"egress": "some"},
        {"egress": "full", "extra": 1},
        {"egress": "full", "allow": ["1.1.1.1"]},
        {"egress": "none", "allow": ["1.1.1.1"]},
        {"egress": "allowlist", "allow": ["1.1.1.1"] * 9},
        {"egress": "allowlist", "allow": "1.1.1.1"},
    ]
    for network in cases:
        with pytest.raises(errors.InvalidRequest):
            parse(network)


def test_private_entries_are_accepted_but_still_denied() -> None:
    """Allowlisting 10.0.0.1 is accepted, and the ruleset drops private ranges before
    any allow rule."""
    policy = parse({"egress": "allowlist", "allow": ["10.0.0.1:80"]})
    assert policy is not None
    text = namespace_ruleset(policy, Slot.of_guest("10.9.0.2"), "10.9.0.0/16", [])
    deny = text.index("10.0.0.0/8")
    assert deny < text.index("ip daddr 10.0.0.1/32 meta l4proto { tcp, udp } th dport 80 accept")


def test_policy_json_round_trip(tmp_path: Path) -> None:
    """A plan survives its record on disk (pause/resume, server restart)."""
    policy = EgressPolicy(
        "allowlist", (AllowRule(ipaddress.IPv4Network("1.2.3.0/24"), 443, "1.2.3.0/24:443"),)
    )
    plan = netplan.NetworkPlan(policy, Slot.of_guest("10.9.0.10"), "10.9.0.0/16", ("1.1.1.1",))
    netplan.save(tmp_path, "abc", plan)
    assert netplan.load(tmp_path, "abc") == plan
    assert netplan.recorded_ids(tmp_path) == ["abc"]
    netplan.forget(tmp_path, "abc")
    assert netplan.load(tmp_path, "abc") is None
    assert netplan.recorded_ids(tmp_path) == []


# --- addresses --------------------------------------------------------------------------------


def test_slots_are_unique_and_laid_out() -> None:
    """Allocation skips addresses in use; a slot's four addresses sit in its /29."""
    first = allocate("10.9.0.0/16", [])
    assert (first.gateway, first.guest, first.host_veth, first.ns_veth) == (
        "10.9.0.1",
        "10.9.0.2",
        "10.9.0.5",
        "10.9.0.6",
    )
    second = allocate("10.9.0.0/16", [first.guest, None])
    assert second.guest == "10.9.0.10" and second.block == "10.9.0.8/29"
    assert Slot.of_guest(second.guest) == second


def test_full_cidr_is_a_quota_error() -> None:
    """A /29 holds one sandbox; the second create is refused with QuotaExceeded."""
    only = allocate("10.9.0.0/29", [])
    with pytest.raises(errors.QuotaExceeded):
        allocate("10.9.0.0/29", [only.guest])
    with pytest.raises(errors.InvalidRequest):
        allocate("10.9.0.0/30", [])


def test_names_fit_the_kernel() -> None:
    """Interface names stay within 15 bytes, also for the library's 16-character ids."""
    assert host_veth_name("0123456789ab") == "ebh0123456789ab"
    assert len(host_veth_name("0123456789abcdef")) == 15
    assert namespace_name("0123456789ab") == "emberbox-0123456789ab"


# --- rules ------------------------------------------------------------------------------------


def test_namespace_ruleset_full_and_allowlist() -> None:
    """Full egress ends in accept after every deny; allowlist ends in drop; the guest may
    only send from its own address; the host's addresses and the CIDR are dropped."""
    slot = Slot.of_guest("10.9.0.2")
    full = namespace_ruleset(EgressPolicy("full"), slot, "10.9.0.0/16", ["192.0.2.2", "fd00::2"])
    lines = [line.strip() for line in full.splitlines()]
    start = lines.index("chain egress {") + 1
    egress = lines[start : lines.index("}", start)]
    assert egress[-3:] == ["ip daddr 255.255.255.255 drop", "accept", "drop"]
    assert "ip daddr { 192.0.2.2 } drop" in egress
    assert "ip daddr 10.9.0.0/16 drop" in egress
    assert 'iifname "tap0" oifname "veth0" ip saddr 10.9.0.2 jump egress' in lines
    assert any(line.startswith("ip6 daddr") and "fd00::2" in line for line in lines)
    allowlist = namespace_ruleset(EgressPolicy("allowlist"), slot, "10.9.0.0/16", [])
    assert [line.strip() for line in allowlist.splitlines()][-3:] == ["drop", "}", "}"]


def test_rulesets_are_valid_nft() -> None:
    """nft itself accepts both rulesets (a dry run: --check changes nothing)."""
    nft = Path("/usr/sbin/nft")
    if not nft.exists():
        pytest.skip("nft is not installed")
    policy = parse({"egress": "allowlist", "allow": ["1.2.3.0/24:443", "example.test"]})
    assert policy is not None
    for text in (
        namespace_ruleset(policy, Slot.of_guest("10.9.0.2"), "10.9.0.0/16", ["192.0.2.2", "::1"]),
        host_ruleset(),
    ):
        check = subprocess.run(
            [str(nft), "--check", "-f", "-"], input=text, text=True, capture_output=True
        )
        if "Operation not permitted" in check.stderr:
            pytest.skip("nft --check needs CAP_NET_ADMIN")
        assert check.returncode == 0, check.stderr + text


# --- settings, QEMU and the guest -----------------------------------------------------------


def test_firecracker_refuses_network() -> None:
    """With EMBERBOX_VMM=firecracker a network request is a clear InvalidRequest."""
    with pytest.raises(errors.InvalidRequest, match="Firecracker"):
        validate_network(Settings(vmm="firecracker"), {"egress": "full"})
    assert validate_network(Settings(vmm="firecracker"), None) is None


def test_every_vm_has_a_nic() -> None:
    """The NIC is always there: on a TAP descriptor, or on a hub port to nowhere."""
    files = BootFiles(Path("k"), Path("v"), Path("i"), Path("r"))
    config = VMConfig(vm_id="x", work_dir=Path("/w"), guest=files)
    nowhere = network_args(config, "tcg")
    assert nowhere[:2] == ["-netdev", "hubport,id=net0,hubid=0"]
    assert nowhere[3].startswith("virtio-net-pci,netdev=net0,")
    tap = network_args(VMConfig(vm_id="x", work_dir=Path("/w"), guest=files, tap_fd=7), "kvm")
    assert tap[:2] == ["-netdev", "tap,id=net0,fd=7"]
    assert tap[3].startswith("virtio-net-device,") and tap[3] == nowhere[3].replace("pci", "device")


def test_guest_config_and_ioctl_structures() -> None:
    """The hello's network dict, and the guest's structs have the kernel's sizes."""
    plan = netplan.NetworkPlan(
        EgressPolicy("full"), Slot.of_guest("10.9.0.2"), "10.9.0.0/16", ("1.1.1.1",)
    )
    assert plan.guest_config() == {
        "address": "10.9.0.2",
        "prefix": 30,
        "gateway": "10.9.0.1",
        "dns": ["1.1.1.1"],
    }
    assert len(netconf._rtentry("10.9.0.1", netconf.RTF_UP)) == 120  # struct rtentry, LP64
    assert struct.calcsize(netconf.RTENTRY) <= 120
    assert len(netconf._sockaddr(None)) == 16
    assert netconf._netmask(30) == "255.255.255.252"
    with pytest.raises(ValueError):
        netconf._fields({"address": "10.0.0.2", "prefix": 33, "gateway": "10.0.0.1"})


# --- the manager (fake VMs) ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_manager_allocates_addresses_and_passes_plans(tmp_path: Path) -> None:
    """Networked creates get unique addresses (reused once freed) and a plan for the
    factory; others get neither; a bad entry is refused before anything starts."""
    from emberbox.service.sandboxes.manager import SandboxManager
    from tests.support.fakes_sandbox import FakeImages, FakeVMM

    settings = Settings(
        data_dir=tmp_path / "data",
        cache_dir=tmp_path / "cache",
        network_cidr="10.9.0.0/24",
        pool_size=0,
    )
    vmm, plans = FakeVMM(), dict[str, object]()

    async def start(settings: Settings, *, network: object = None, **kwargs: Any) -> object:
        plans[kwargs["sandbox_id"]] = network
        return await vmm.start(settings, **kwargs)

    factory: Any = start  # a SandboxFactory that also takes network=
    attacher: Any = vmm.attach
    manager = SandboxManager(
        settings, sandbox_factory=factory, sandbox_attacher=attacher, image_registry=FakeImages()
    )
    async with manager:
        full = await manager.create(network={"egress": "full"})
        allow = await manager.create(network={"egress": "allowlist", "allow": ["203.0.113.7:443"]})
        bare = await manager.create()
        assert (full.ip_address, allow.ip_address, bare.ip_address) == (
            "10.9.0.2",
            "10.9.0.10",
            None,
        )
        assert plans[bare.id] is None
        plan = plans[allow.id]
        assert isinstance(plan, netplan.NetworkPlan)
        assert plan.slot.guest == allow.ip_address
        assert [(str(r.network), r.port) for r in plan.policy.allow] == [("203.0.113.7/32", 443)]
        await manager.kill(full.id)
        again = await manager.create(network={"egress": "full"})
        assert again.ip_address == "10.9.0.2"
        with pytest.raises(errors.InvalidRequest, match=r"'1\.2\.3\.4:0'"):
            await manager.create(network={"egress": "allowlist", "allow": ["1.2.3.4:0"]})
        assert len(await manager.list()) == 4  # the refused create left no row


@pytest.mark.anyio
async def test_agent_network_hello_outside_a_vm() -> None:
    """Off PID 1 the agent touches no interface: it says so; a malformed network is an
    InvalidRequest answer (the real set-up is covered by tests/integration)."""
    from tests.support.agent import running_agent

    with running_agent() as agent:
        async with await agent.connect() as client:
            await client.handshake(timeout_s=10)
            info = await client.configure_network(plan_config())
            assert list(info.warnings) == ["network: skipped, the agent is not PID 1"]
            with pytest.raises(errors.InvalidRequest, match="'network' must be"):
                await client.request("hello", network="eth0 up")


def plan_config() -> dict[str, object]:
    slot = Slot.of_guest("10.9.0.2")
    return netplan.NetworkPlan(EgressPolicy("full"), slot, "10.9.0.0/16").guest_config()


def test_cli_network_options() -> None:
    """--egress / --allow become the request's network; neither means no network."""
    from emberbox.cli.sandbox import _network

    assert _network(None, None) is None
    assert _network("full", None) == {"egress": "full", "allow": []}
    assert _network(None, ["1.2.3.4:443"]) == {"egress": "allowlist", "allow": ["1.2.3.4:443"]}


def test_a_resolver_that_never_answers_is_a_400_within_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Host names resolve in a few threads of their own with a deadline: a hanging
    resolver gives InvalidRequest after RESOLVE_TIMEOUT_S instead of a stuck create."""
    release = threading.Event()

    def hang(settings: Settings, network: object) -> None:
        release.wait(10)

    monkeypatch.setattr(validation, "RESOLVE_TIMEOUT_S", 0.2)
    monkeypatch.setattr(validation, "validate_network", hang)
    network = {"egress": "allowlist", "allow": ["example.org:443"]}
    started = time.monotonic()
    try:
        with pytest.raises(errors.InvalidRequest, match=r"did not resolve within 0\.2 s"):
            anyio.run(validation.resolve_network, Settings(), network)
    finally:
        release.set()
    assert time.monotonic() - started < 2
