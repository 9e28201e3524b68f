"""Building and removing the lab: namespaces, links, addresses, servers, and
`down` leaving nothing behind, also after a crash."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from lasthop.lab import Lab, Plan, down, state, traffic
from lasthop.lab import plan as P
from lasthop.lab.namespaces import existing, ns_exec, pids_in
from lasthop.lab.topology import lab_namespaces

pytestmark = [pytest.mark.root, pytest.mark.netns]


def _links(ns: str) -> dict[str, dict[str, Any]]:
    """`ip -j addr` of namespace ns, by interface name (JSON: any values)."""
    out = ns_exec(ns, ["ip", "-j", "-d", "addr", "show"]).stdout
    return {link["ifname"]: link for link in json.loads(out)}


def test_up_builds_every_namespace_with_the_planned_macs(bridged_lab: Lab) -> None:
    """Each namespace exists; firewalls, clients and VMs carry the plan's MACs and addresses."""
    plan = bridged_lab.plan
    assert sorted(lab_namespaces(plan.name)) == sorted(plan.namespaces())
    fw2 = _links(plan.firewall(2).ns)
    assert fw2[P.FW_TRANSIT]["address"] == plan.firewall(2).transit_mac
    assert {a["local"] for a in fw2[P.FW_TRANSIT]["addr_info"]} >= {"10.0.0.2", "fd00::2"}
    vm3 = _links(plan.vm(3).ns)[P.ETH]
    assert vm3["address"] == plan.vm(3).mac
    assert not any("tentative" in str(a) for a in vm3["addr_info"]), "IPv6 DAD must be off"
    host = _links(plan.host.ns)
    assert host[P.UPLINK]["master"] == P.BRIDGE
    assert all(host[plan.vm(n).port]["master"] == P.BRIDGE for n in plan.vms)


def test_every_vm_routes_by_fw1_in_bridged_mode(bridged_lab: Lab) -> None:
    """The asymmetry is built in: every VM's default gateway is fw1."""
    for n in bridged_lab.plan.vms:
        routes = bridged_lab.exec(f"vm{n}", ["ip", "route", "show", "default"])
        assert "via 10.0.0.1 " in routes


def test_routed_host_routes_and_firewalls_know_the_vm_subnet(routed_lab: Lab) -> None:
    """Routed: VMs behind the host, its default via fw1, firewalls route the VM net via it."""
    assert "via 10.0.0.1 " in routed_lab.exec("host", ["ip", "route", "show", "default"])
    assert "via fd00::1 " in routed_lab.exec("host", ["ip", "-6", "route", "show", "default"])
    for n in routed_lab.plan.sites:
        assert "10.2.0.0/24 via 10.0.0.100" in routed_lab.exec(f"fw{n}", ["ip", "route"])
    assert P.UPLINK not in routed_lab.exec("host", ["ip", "link", "show", "master", P.BRIDGE])


def test_every_firewall_routes_to_every_client_network(any_lab: Lab) -> None:
    """A reply sent the wrong way is dropped for being unknown, not for lack of a route."""
    plan = any_lab.plan
    for n in plan.sites:
        routes = any_lab.exec(f"fw{n}", ["ip", "route"]) + any_lab.exec(
            f"fw{n}", ["ip", "-6", "route"]
        )
        for m in plan.sites:
            if m != n:
                assert f"{P.client_net(m)[0]} via 10.0.0.{m}" in routes
                assert f"{P.client_net(m)[1]} via fd00::{m}" in routes


def test_servers_run_in_every_vm_and_down_stops_them(lab_name: str) -> None:
    """Each VM runs one server process; down kills it and removes every namespace."""
    lab = Lab.up(Plan(lab_name))
    pids = dict(lab.state.servers)
    assert set(pids) == {"vm1", "vm2", "vm3"}
    assert all(lab.servers_alive().values())
    removed = down(lab_name)
    assert sorted(removed) == sorted(lab.plan.namespaces())
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert state.load(lab_name) is None


def test_down_cleans_up_after_a_crash(lab_name: str) -> None:
    """With its state file gone (a crashed `up`), down still finds the namespaces and processes."""
    lab = Lab.up(Plan(lab_name))
    pids = list(lab.state.servers.values())
    state.remove(lab_name)
    assert Lab.find(lab_name) is None
    assert down(lab_name)
    assert not [ns for ns in existing() if ns.startswith(f"{lab_name}-")]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_down_leaves_other_labs_alone(lab_name: str) -> None:
    """Removing lab X keeps lab X1 (a name that X is a prefix of)."""
    other = f"{lab_name}x"
    try:
        Lab.up(Plan(other, sites=[1], vms=[1]))
        Lab.up(Plan(lab_name, sites=[1], vms=[1]))
        down(lab_name)
        assert sorted(lab_namespaces(other)) == sorted(Plan(other, sites=[1], vms=[1]).namespaces())
        assert all(pids for pids in pids_in([Plan(other).vm(1).ns]).values())
    finally:
        down(other)


def test_added_site_and_vm_join_the_running_lab(bridged_lab: Lab) -> None:
    """add_site(4) and add_vm(4) join the running lab: vm4 serves, cl4 is as asymmetric as cl2."""
    bridged_lab.add_vm(4)
    bridged_lab.add_site(4)
    result = traffic.check(bridged_lab.plan, n=1, clients=[1, 4], vms=[4], protos=["tcp"])
    assert {p.client: p.ok for p in result.paths if p.family == 4} == {"cl1": True, "cl4": False}
    assert "10.1.4.0/24 via 10.0.0.4" in bridged_lab.exec("fw1", ["ip", "route"])


def test_failover_changes_the_firewall_mac(bridged_lab: Lab) -> None:
    new = bridged_lab.failover(2)
    assert new == bridged_lab.plan.firewall(2).failover_mac
    assert _links(bridged_lab.plan.firewall(2).ns)[P.FW_TRANSIT]["address"] == new
