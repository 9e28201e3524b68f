"""The traffic check, and the lab's reason to exist: without lasthop it is
asymmetric — cl1 (behind the VMs' gateway fw1) works, every path through fw2
and fw3 dies — on both host modes, IPv4 and IPv6, TCP, HTTP and UDP."""

from __future__ import annotations

import pytest

from lasthop.lab import Lab, traffic
from lasthop.lab.demo import expect_asymmetric

pytestmark = [pytest.mark.root, pytest.mark.netns]


def test_without_lasthop_only_the_vms_gateway_side_works(any_lab: Lab) -> None:
    """cl1 -> every VM works; cl2, cl3 -> every VM die (replies go to fw1); all protos, families."""
    result = traffic.check(any_lab.plan, n=2)
    assert len(result.paths) == 3 * 3 * 3 * 2
    assert expect_asymmetric(result, "without lasthop") == []
    for path in result.select(client="cl1"):
        assert path.ok and path.firewall == "fw1"
    for client in ("cl2", "cl3"):
        for path in result.select(client=client):
            assert path.dead and path.errors == {"timeout": 2}, path
    assert result.elapsed_s < 3.0, "checks run concurrently: about one timeout in all"


def test_the_wrong_way_replies_are_counted_at_fw1(any_lab: Lab) -> None:
    """The replies die at fw1, which counts them; fw2 and fw3 drop nothing."""
    traffic.check(any_lab.plan, n=1, clients=[2], protos=["tcp", "udp"])
    counters = any_lab.counters()
    assert counters["fw1"]["drop_invalid"] >= 3 * 2  # SYN-ACKs: 3 VMs, 2 families
    assert counters["fw1"]["drop_outside"] >= 3 * 2  # UDP replies
    assert not any(
        counters["fw2"][c] for c in ("drop_invalid", "drop_outside", "drop_not_syn", "drop_other")
    )


def test_the_http_answer_names_the_vm(bridged_lab: Lab) -> None:
    """An HTTP GET reaches the VM it was sent to (the body is the VM's name)."""
    result = traffic.check(bridged_lab.plan, n=1, clients=[1], protos=["http"])
    assert all(p.ok for p in result.paths) and len(result.paths) == 3 * 2


def test_a_long_lived_session_echoes_until_closed(bridged_lab: Lab) -> None:
    with traffic.EchoSession(bridged_lab.plan, client=1, vm=2, family=6) as session:
        assert all(session.exchange() for _ in range(3))
