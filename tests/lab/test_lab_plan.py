"""The addressing plan: names, MACs, addresses (no root needed)."""

from __future__ import annotations

import ipaddress

import pytest

from lasthop.lab import plan as P


@pytest.mark.parametrize("routed", [False, True])
def test_every_interface_name_fits_the_kernel_limit(routed: bool) -> None:
    """Interface names stay within 15 characters, namespace names carry the lab name."""
    plan = P.Plan("abcdefgh", routed=routed, sites=[1, 2, 3, 9], vms=[1, 9])
    names = [
        P.BRIDGE,
        P.UPLINK,
        P.FW_TRANSIT,
        P.FW_LAN,
        P.ETH,
        *(plan.vm(n).port for n in plan.vms),
    ]
    assert all(len(n) <= 15 for n in names)
    assert all(ns.startswith("abcdefgh-") for ns in plan.namespaces())


def test_macs_are_unique_and_name_their_owner() -> None:
    """Every MAC of the lab is distinct, locally administered, and who_has() names its owner."""
    plan = P.Plan(sites=[1, 2, 3, 4], vms=[1, 2, 3])
    macs = {plan.host.uplink_mac, plan.host.bridge_mac}
    for n in plan.sites:
        fw, cl = plan.firewall(n), plan.client(n)
        macs |= {fw.transit_mac, fw.failover_mac, fw.lan_mac, cl.mac}
        assert P.who_has(fw.transit_mac) == fw.name
        assert P.who_has(fw.failover_mac) == f"{fw.name} (fail-over)"
    for n in plan.vms:
        macs |= {plan.vm(n).mac, plan.vm(n).port_mac}
        assert P.who_has(plan.vm(n).mac) == plan.vm(n).name
    assert len(macs) == 2 + 4 * 4 + 2 * 3
    assert all(int(m.split(":")[0], 16) & 0x02 for m in macs)
    assert P.who_has("00:11:22:33:44:55") == "00:11:22:33:44:55"


def test_firewall_of_names_the_firewall_of_either_transit_mac() -> None:
    """A firewall's transit MAC and its fail-over MAC both name it; no other MAC does."""
    plan = P.Plan()
    fw = plan.firewall(2)
    assert P.firewall_of(fw.transit_mac) == P.firewall_of(fw.failover_mac) == "fw2"
    assert P.firewall_of(fw.lan_mac) == P.firewall_of(plan.vm(1).mac) == ""
    assert P.firewall_of("00:11:22:33:44:55") == ""


@pytest.mark.parametrize("routed", [False, True])
def test_addresses_are_private_and_in_their_networks(routed: bool) -> None:
    """Every address is private; clients sit in their site's net, VMs in the transit or VM net."""
    plan = P.Plan(routed=routed)
    for n in plan.sites:
        net4, net6 = map(ipaddress.ip_network, P.client_net(n))
        assert ipaddress.ip_address(plan.client(n).addr.v4) in net4
        assert ipaddress.ip_address(plan.client(n).addr.v6) in net6
    vm_nets = P.VM_SUBNET if routed else P.TRANSIT
    for n in plan.vms:
        addr = plan.vm(n).addr
        assert ipaddress.ip_address(addr.v4) in ipaddress.ip_network(vm_nets[0])
        assert ipaddress.ip_address(addr.v6) in ipaddress.ip_network(vm_nets[1])
        assert ipaddress.ip_address(addr.v4).is_private and ipaddress.ip_address(addr.v6).is_private
    gateway = plan.vm(1).gateway
    assert gateway == (plan.host.vm_gateway if routed else plan.firewall(1).transit)


def test_namespace_pattern_matches_only_its_own_lab() -> None:
    """down("lh") must not touch lab "lh2" or another tool's "lh-x" namespace."""
    pattern = P.lab_namespace_pattern("lh")
    assert all(pattern.fullmatch(ns) for ns in P.Plan("lh").namespaces())
    assert not any(
        pattern.fullmatch(ns) for ns in ["lh2-fw1", "lh-x", "lh-fw", "xlh-sw", "lh-host2"]
    )


def test_bad_names_and_numbers_are_refused() -> None:
    with pytest.raises(ValueError):
        P.Plan("Has-Dash")
    with pytest.raises(ValueError):
        P.Plan("lh", sites=[10])
