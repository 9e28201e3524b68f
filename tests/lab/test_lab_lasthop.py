"""lasthop in the lab (the agent run as `python -m lasthop run --netns ...`,
lasthop.lab.runner): every path works, and keeps working across the changes
under test — a firewall fail-over mid-connection, an agent restart, a VM port
added while the agent follows the bridge."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lasthop.lab import Lab, runner, traffic
from lasthop.lab.demo import expect_all_ok, expect_asymmetric
from lasthop.lab.namespaces import eventually
from lasthop.lab.traffic import EchoSession

needs_agent = pytest.mark.skipif(not runner.available(), reason="agent not built yet")
pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.bpf, needs_agent]


@pytest.fixture
def lasthop_on(any_lab: Lab) -> Iterator[runner.AgentRunner]:
    with runner.AgentRunner(any_lab.plan) as running:
        yield running


@pytest.fixture(scope="module")
def served(module_lab: Lab) -> Iterator[Lab]:
    """A lab (each host mode) with lasthop running, shared by the tests that only
    make connections and read (the three below); the tests that stop the agent,
    fail a firewall over or restart take a lab and agent of their own."""
    with runner.AgentRunner(module_lab.plan) as running:
        assert running.ready_line.startswith(runner.READY_PREFIX)
        yield module_lab


def test_every_path_works_with_lasthop(served: Lab) -> None:
    """The asymmetric lab becomes symmetric: every client, VM, protocol and family."""
    result = traffic.check(served.plan, n=2)
    assert expect_all_ok(result, "with lasthop") == []
    assert not any(c["drop_invalid"] or c["drop_outside"] for c in served.counters().values())


def test_requests_of_answered_connections_take_the_fast_path(served: Lab) -> None:
    """Once a VM has answered, its connection's later requests go from the uplink
    straight to the VM's port (bridged: past the bridge; routed: past routing)."""
    before = runner.stats(served.plan)["totals"]["fast_to_vm"]  # the lab is shared
    result = traffic.check(served.plan, n=1, protos=["tcp", "http"])
    assert expect_all_ok(result, "with lasthop") == []
    totals = runner.stats(served.plan)["totals"]
    assert totals["fast_to_vm"] > before, totals


def test_show_names_each_connections_firewall(served: Lab) -> None:
    """`lasthop show --json`: each client's connections carry its firewall's MAC."""
    traffic.check(served.plan, n=1, protos=["tcp"])
    rows = runner.show(served.plan)
    plan = served.plan
    by_client = {
        plan.client(n).addr.of(f): plan.firewall(n).transit_mac for n in plan.sites for f in (4, 6)
    }
    seen = set()
    for row in rows:
        if row["src"] in by_client:
            assert row["mac"] == by_client[row["src"]], row
            assert row["uplink"] == plan.host.uplink
            assert {"proto", "dst", "sport", "dport", "zone", "vlan", "age_s", "packets"} <= set(
                row
            )
            seen.add(row["src"])
    assert seen == set(by_client)


def test_detach_brings_the_asymmetry_back(any_lab: Lab, lasthop_on: runner.AgentRunner) -> None:
    lasthop_on.stop()
    runner.detach(any_lab.plan)
    result = traffic.check(any_lab.plan, n=1, protos=["tcp", "udp"])
    assert expect_asymmetric(result, "after detach") == []


@pytest.mark.parametrize("family", [4, 6])
def test_a_firewall_failover_mid_connection_keeps_working(
    any_lab: Lab, lasthop_on: runner.AgentRunner, family: int
) -> None:
    """fw2 moves to a standby MAC mid-connection: the next request packet re-teaches lasthop."""
    plan = any_lab.plan
    with EchoSession(plan, client=2, vm=1, family=family) as session:
        assert session.exchange()
        new_mac = any_lab.failover(2)
        assert session.exchange(timeout=3.0), "the connection died at the fail-over"
        rows = [
            r for r in runner.show(plan) if r["sport"] == session.local_port and r["proto"] == "tcp"
        ]
        assert [r["mac"] for r in rows] == [new_mac]
    result = traffic.check(plan, n=1, clients=[2], protos=["tcp", "udp"], families=[family])
    assert expect_all_ok(result, "new connections after the fail-over") == []


def test_an_agent_restart_keeps_a_long_lived_connection(
    any_lab: Lab, lasthop_on: runner.AgentRunner
) -> None:
    """Stopping the agent leaves the data path attached; a new agent adopts the table."""
    with EchoSession(any_lab.plan, client=3, vm=2) as session:
        assert session.exchange()
        assert lasthop_on.stop() == 0
        assert session.exchange(), "stopping the agent broke the connection"
        lasthop_on.start()
        assert session.exchange(), "restarting the agent broke the connection"
    assert expect_all_ok(traffic.check(any_lab.plan, n=1, clients=[3]), "after the restart") == []


def test_bridge_mode_follows_a_vm_port_added_while_running(bridged_lab: Lab) -> None:
    """`--bridge br0`: vm4 plugged in after the agent started is served like the others."""
    with runner.AgentRunner(bridged_lab.plan, bridge=True):
        bridged_lab.add_vm(4)

        def vm4_works() -> bool:
            return traffic.check(bridged_lab.plan, n=1, clients=[2], vms=[4], protos=["tcp"]).all_ok

        assert eventually(vm4_works, timeout=15.0, every=0.2), (
            "cl2 -> vm4 never worked: the new port was not attached"
        )
        assert expect_all_ok(traffic.check(bridged_lab.plan, n=1), "every VM incl. vm4") == []
