"""`lasthop pcap` on captures of the lab's uplink (lasthop.lab.capture): the
report must match the paths the lab is built to have — every request comes
through its client's firewall; without lasthop every reply leaves for fw1,
with lasthop each goes back to the firewall its request came through."""

from __future__ import annotations

from pathlib import Path

import pytest

from lasthop.capture import Conn, analyse, read_names
from lasthop.lab import Lab, runner, traffic
from lasthop.lab import plan as P
from lasthop.lab.capture import capturing, write_names

needs_agent = pytest.mark.skipif(not runner.available(), reason="agent not built yet")
pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.bpf, needs_agent]

PROTOS = ["tcp", "udp"]


def _firewall_of_client(plan: P.Plan) -> dict[str, str]:
    """Client address (both families) -> the transit MAC of its firewall."""
    return {
        plan.client(n).addr.of(f): plan.firewall(n).transit_mac for n in plan.sites for f in (4, 6)
    }


def _lab_conns(plan: P.Plan, path: Path) -> list[Conn]:
    """The report's connections between the lab's clients and VMs."""
    clients = _firewall_of_client(plan)
    vms = {plan.vm(n).addr.of(f) for n in plan.vms for f in (4, 6)}
    report = analyse([path])
    conns = [c for c in report.conns.values() if c.client in clients and c.server in vms]
    assert conns, report.summary()
    return conns


def test_pcap_reports_the_labs_paths(any_lab: Lab, tmp_path: Path) -> None:
    plan = any_lab.plan
    fw_of = _firewall_of_client(plan)
    fw1 = plan.firewall(1).transit_mac
    names = read_names(write_names(plan, tmp_path).read_text().splitlines())
    assert names[fw1] == "fw1"

    with capturing(plan, tmp_path / "off.pcap"):
        traffic.check(plan, n=1, protos=PROTOS, timeout=0.5)
    off = _lab_conns(plan, tmp_path / "off.pcap")
    for c in off:
        assert {h.mac for h in c.request_from} == {fw_of[c.client]}, c
        if c.answered:
            assert {h.mac for h in c.reply_to} == {fw1}, c
            assert c.return_asymmetric == (fw_of[c.client] != fw1), c
    # every client's connections were answered (their replies only die beyond the host)
    assert {fw_of[c.client] for c in off if c.return_asymmetric} == {
        plan.firewall(n).transit_mac for n in plan.sites if n != 1
    }

    with runner.AgentRunner(plan), capturing(plan, tmp_path / "on.pcap"):
        result = traffic.check(plan, n=1, protos=PROTOS)
    assert result.all_ok
    on = _lab_conns(plan, tmp_path / "on.pcap")
    for c in on:
        assert c.answered and not c.return_asymmetric, c
        assert {h.mac for h in c.reply_to} == {fw_of[c.client]}, c
        assert {h.where for h in c.reply_to} == {"on"}
