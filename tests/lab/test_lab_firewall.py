"""The firewalls: conntrack-stateful, connections start only from the client
side with a bare SYN, and every drop is counted by reason."""

from __future__ import annotations

import socket

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import GRE

from lasthop.lab import Lab, firewall
from lasthop.lab.namespaces import eventually, open_socket

pytestmark = [pytest.mark.root, pytest.mark.netns]


def _assert_delta(
    lab: Lab, fw: str, before: dict[str, dict[str, int]], expected: dict[str, int]
) -> None:
    """fw's counters that changed since *before* come to read *expected* (waited
    for, up to 5 s, rather than slept for)."""
    delta: dict[str, int] = {}

    def settled() -> bool:
        nonlocal delta
        after = lab.counters()[fw]
        delta = {k: v - before[fw][k] for k, v in after.items() if v != before[fw][k]}
        return delta == expected

    eventually(settled, timeout=5.0, every=0.05)
    assert delta == expected


def test_counters_read_as_numbers(bridged_lab: Lab) -> None:
    counters = firewall.counters(bridged_lab.plan.firewall(1).ns)
    assert set(counters) == set(firewall.COUNTERS)
    assert all(isinstance(v, int) for v in counters.values())


def test_a_new_tcp_connection_without_a_bare_syn_is_dropped(bridged_lab: Lab) -> None:
    """An ACK opening a connection from the client side is counted as drop_not_syn (v4, v6)."""
    plan = bridged_lab.plan
    cl, vm = plan.client(1), plan.vm(1)
    before = bridged_lab.counters()
    ack4 = IP(src=cl.addr.v4, dst=vm.addr.v4) / TCP(sport=40001, dport=7, flags="A", seq=1, ack=1)
    with open_socket(cl.ns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as s:
        s.sendto(bytes(ack4), (vm.addr.v4, 0))
    ack6 = IPv6(src=cl.addr.v6, dst=vm.addr.v6) / TCP(
        sport=40001, dport=7, flags="PA", seq=1, ack=1
    )
    with open_socket(cl.ns, socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_TCP) as s:
        s.sendto(bytes(ack6[TCP]), (vm.addr.v6, 0))
    _assert_delta(bridged_lab, "fw1", before, {"drop_not_syn": 2})


def test_a_connection_from_the_transit_side_is_dropped(bridged_lab: Lab) -> None:
    """A VM cannot open a connection to a client: counted as drop_outside."""
    plan = bridged_lab.plan
    before = bridged_lab.counters()
    with open_socket(plan.vm(1).ns, socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"hello", (plan.client(1).addr.v4, 7))
    with open_socket(plan.vm(2).ns, socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.sendto(b"hello", (plan.client(1).addr.v6, 7))
    _assert_delta(bridged_lab, "fw1", before, {"drop_outside": 2})


def test_other_protocols_are_dropped(bridged_lab: Lab) -> None:
    """GRE from the client side is neither TCP, UDP nor ICMP: counted as drop_other."""
    plan = bridged_lab.plan
    cl, vm = plan.client(2), plan.vm(1)
    before = bridged_lab.counters()
    with open_socket(cl.ns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as s:
        s.sendto(bytes(IP(src=cl.addr.v4, dst=vm.addr.v4) / GRE()), (vm.addr.v4, 0))
    _assert_delta(bridged_lab, "fw2", before, {"drop_other": 1})


def test_a_reply_through_the_wrong_firewall_is_dropped_as_unknown(bridged_lab: Lab) -> None:
    """cl2's SYN passes fw2 (accepted_new); vm1's SYN-ACK dies at fw1 (drop_invalid)."""
    plan = bridged_lab.plan
    before = bridged_lab.counters()
    with open_socket(plan.client(2).ns, socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        with pytest.raises(TimeoutError):
            s.connect((plan.vm(1).addr.v4, 7))
    _assert_delta(bridged_lab, "fw2", before, {"accepted_new": 1})
    _assert_delta(bridged_lab, "fw1", before, {"drop_invalid": 1})
