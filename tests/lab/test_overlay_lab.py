"""lasthop in the overlay lab (Plan.overlay): the firewalls reach the host
through VXLAN, each from its own tunnel endpoint, and fw1 and fw2 share one
MAC, so only the endpoint tells their connections apart.

    cl1 ── fw1 ─ vxlan 10.255.0.1 ──┐                      ┌── vm1
    cl2 ── fw2 ─ vxlan fd00:ff::2 ──┼─ sw ─ up0 ─ vx0 ─ br0 ┼── vm2
    cl3 ── fw3 ─ vxlan 10.255.0.3 ──┘  (underlay)  (external) └── vm3
           (fw1 and fw2: MAC 02:00:00:f0:00:01)

A request from cl2 comes out of vx0 with tunnel key {fd00:ff::2, VNI 100}:
lasthop learns it; the VM's reply (to its gateway, fw1's MAC) is sent into
vx0 with that key, so it reaches fw2, which saw the connection open.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lasthop import abi, libbpf
from lasthop.lab import Lab, Plan, runner, traffic
from lasthop.lab import plan as P
from lasthop.lab.demo import expect_all_ok, expect_dead_only
from lasthop.lab.namespaces import eventually, ip_batch, ns_exec, open_socket
from lasthop.lab.traffic import EchoSession

needs_agent = pytest.mark.skipif(not runner.available(), reason="agent not built yet")
pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.bpf, needs_agent]


@pytest.fixture
def overlay_lab(lab_name: str) -> Lab:
    return Lab.up(Plan(lab_name, overlay=True))


@pytest.fixture
def lasthop_on(overlay_lab: Lab) -> Iterator[runner.AgentRunner]:
    with runner.AgentRunner(overlay_lab.plan) as running:
        yield running


def test_two_firewalls_share_one_mac_and_differ_by_endpoint() -> None:
    plan = Plan("x", overlay=True)
    fw1, fw2, fw3 = (plan.firewall(n) for n in (1, 2, 3))
    assert fw1.transit_mac == fw2.transit_mac != fw3.transit_mac
    assert (fw1.endpoint, fw2.endpoint, fw3.endpoint) == ("10.255.0.1", "fd00:ff::2", "10.255.0.3")
    assert plan.host.uplink == P.VXLAN
    with pytest.raises(ValueError, match="bridged"):
        Plan("x", overlay=True, routed=True)


def test_without_lasthop_no_reply_crosses_the_overlay(overlay_lab: Lab) -> None:
    """An external VXLAN device sends only what carries a tunnel key: the VMs'
    replies, addressed by MAC alone, reach no firewall."""
    result = traffic.check(overlay_lab.plan, n=1, protos=["tcp", "udp"])
    everyone = {f"cl{n}" for n in overlay_lab.plan.sites}
    assert expect_dead_only(result, "without lasthop", everyone) == []


def test_with_lasthop_each_reply_goes_back_through_its_own_endpoint(
    overlay_lab: Lab, lasthop_on: runner.AgentRunner
) -> None:
    """Every client, protocol and family works; `show --json` names each
    connection's endpoint (IPv4 or IPv6) and VNI, fw1 and fw2 with one MAC."""
    plan = overlay_lab.plan
    result = traffic.check(plan, n=1)
    assert expect_all_ok(result, "with lasthop") == []
    assert not any(c["drop_invalid"] or c["drop_outside"] for c in overlay_lab.counters().values())
    by_client = {plan.client(n).addr.of(f): plan.firewall(n) for n in plan.sites for f in (4, 6)}
    seen = set()
    for row in runner.show(plan):
        fw = by_client.get(row["src"])
        if fw is None:
            continue
        assert (row["endpoint"], row["vni"], row["mac"]) == (fw.endpoint, P.VNI, fw.transit_mac)
        assert row["uplink"] == P.VXLAN and "hop_ext" in row["flags"], row
        seen.add(row["src"])
    assert seen == set(by_client)
    totals = runner.stats(plan)["totals"]
    assert totals["encap_redirected"] > 0 and totals["encap_unsupported"] == 0, totals


def _ip_checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _flood_frames(plan: Plan, count: int) -> Iterator[bytes]:
    """VXLAN frames from *count* distinct (forged) endpoints, each a TCP SYN of
    a new connection from cl3 to vm1: built once with scapy, then only the
    outer source address (and the IP checksum) and the inner port change."""
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.l2 import Ether
    from scapy.layers.vxlan import VXLAN

    vm, cl, host = plan.vm(1), plan.client(3), plan.host
    assert host.underlay
    template = bytes(
        Ether(dst=host.uplink_mac, src=P.mac(P.MAC_SWITCH, 3))
        / IP(src="10.255.1.0", dst=host.underlay.v4, ttl=64)
        / UDP(sport=49152, dport=P.VXLAN_PORT, chksum=0)
        / VXLAN(flags="Instance", NextProtocol=0, vni=P.VNI)  # scapy's default is VXLAN-GPE
        / Ether(dst=vm.mac, src=plan.firewall(3).transit_mac)
        / IP(src=cl.addr.v4, dst=vm.addr.v4)
        / TCP(sport=1024, dport=9, flags="S")
    )
    base = int(ipaddress.IPv4Address("10.255.16.0"))
    sport_off = len(template) - 20  # the inner TCP header's first byte
    for i in range(count):
        frame = bytearray(template)
        frame[26:30] = (base + i).to_bytes(4, "big")
        frame[24:26] = b"\0\0"
        frame[24:26] = _ip_checksum(bytes(frame[14:34])).to_bytes(2, "big")
        frame[sport_off : sport_off + 2] = (1024 + i % 60000).to_bytes(2, "big")
        yield bytes(frame)


def test_a_flood_of_endpoints_neither_grows_the_hop_table_nor_evicts_a_live_hop(
    overlay_lab: Lab, lasthop_on: runner.AgentRunner
) -> None:
    """More distinct endpoints than lh_hop_descs holds: the table stops at its
    slots (a new hop whose HOP_DESC_PROBES slots are taken is refused), the
    surplus is refused and counted (hop_desc_full, not learned), and a
    connection opened before the flood (cl2, through fw2's IPv6 endpoint)
    keeps its hop and its replies."""
    plan = overlay_lab.plan
    pins = overlay_lab.lasthop_pins
    assert pins is not None
    with EchoSession(plan, client=2, vm=1, family=6) as session:
        assert session.exchange()
        fw = plan.firewall(3)
        sock = open_socket(fw.ns, socket.AF_PACKET, socket.SOCK_RAW)
        try:
            sock.bind((P.UNDERLAY_LINK, 0))
            for frame in _flood_frames(plan, abi.MAX_HOP_DESCS + 1000):
                sock.send(frame)
        finally:
            sock.close()
        assert eventually(lambda: runner.stats(plan)["totals"]["hop_desc_full"] > 0, 30.0, 0.5)
        descs = libbpf.Map.pinned(pins / "lh_hop_descs")
        try:  # an array of MAX_HOP_DESCS slots: those in use hold a kind
            used = sum(1 for _, v in descs.items() if abi.HopDesc.from_buffer_copy(v).kind)
            assert 1000 < used <= abi.MAX_HOP_DESCS
        finally:
            descs.close()
        assert session.exchange(), "the live connection lost its hop to the flood"
        rows = [r for r in runner.show(plan) if r["src"] == plan.client(2).addr.v6]
        assert rows and all(r["endpoint"] == plan.firewall(2).endpoint for r in rows), rows


@pytest.mark.parametrize("listing", ["allow", "deny"])
def test_an_endpoint_the_uplink_does_not_trust_is_not_learned_and_is_counted(
    overlay_lab: Lab, tmp_path: Path, listing: str
) -> None:
    """vx0 trusts fw1's and fw2's endpoints (an allow-list), or refuses fw3's
    (a deny-list): cl3's requests through fw3 are not learned -- they take the
    host's normal path, and an external VXLAN device sends no reply of theirs
    -- and are counted hop_untrusted, per endpoint under untrusted_endpoints;
    cl1 and cl2 (fw1, fw2: one MAC, two endpoints) work as ever.

        cl3 ── fw3 ─ vxlan 10.255.0.3 ──▶ vx0: endpoint refused ──▶ not learned
    """
    plan = overlay_lab.plan
    fw1, fw2, fw3 = (plan.firewall(n) for n in (1, 2, 3))
    listed = (
        f"allow_endpoints = {json.dumps([fw1.endpoint, fw2.endpoint + '/128'])}"
        if listing == "allow"
        else f'deny_endpoints = ["{fw3.endpoint}/32"]'
    )
    config = tmp_path / "lasthop.toml"
    config.write_text(f'[[uplink]]\nname = "{P.VXLAN}"\n{listed}\n')
    with runner.AgentRunner(plan, extra=("--config", str(config))):
        result = traffic.check(plan, n=1, protos=["tcp", "udp"])
        assert expect_dead_only(result, f"{listing}_endpoints", {"cl3"}) == []
        stats = runner.stats(plan)
        refused = stats["untrusted_endpoints"]
        assert set(refused) == {P.VXLAN} and set(refused[P.VXLAN]) == {fw3.endpoint}, refused
        assert refused[P.VXLAN][fw3.endpoint] == stats["totals"]["hop_untrusted"] > 0
        rows = runner.show(plan)
        assert rows and not [r for r in rows if r.get("endpoint") == fw3.endpoint], rows


def test_an_endpoint_whose_neighbour_entry_failed_stops_its_entries_until_it_answers(
    overlay_lab: Lab, lasthop_on: runner.AgentRunner
) -> None:
    """fw3's underlay leg stops answering ARP (it still sends: arp_ignore, not
    arp off, which would flush its own entries); the host, sending the VM's reply
    into vx0 toward 10.255.0.3, finds its neighbour entry FAILED: the agent
    marks the endpoint unreachable and the next replies take the host's path
    (counted hop_unreachable) instead of the dead tunnel. fw3 answers again,
    the host's entry is REACHABLE: the connection works again.

        cl3 ── fw3 (ul0: answers no ARP) ─ 10.255.0.3 ─ sw ─ up0 (neigh FAILED) ─ vx0 ─ br0 ── vm1
    """
    plan = overlay_lab.plan
    fw3, host = plan.firewall(3), plan.host
    endpoint = fw3.endpoint

    def unreachable() -> int:
        return int(runner.stats(plan)["totals"].get("hop_unreachable", 0))

    with EchoSession(plan, client=3, vm=1) as session:
        assert session.exchange()
        before = unreachable()
        ns_exec(host.ns, ["sysctl", "-q", "-w", f"net.ipv4.neigh.{P.UPLINK}.retrans_time_ms=100"])
        ignore_arp = f"net.ipv4.conf.{P.UNDERLAY_LINK}.arp_ignore"
        ns_exec(fw3.ns, ["sysctl", "-q", "-w", f"{ignore_arp}=8"])
        ip_batch(host.ns, [f"neigh flush dev {P.UPLINK}"])
        # each exchange's reply asks for the endpoint (FAILED: marked) or, once
        # marked, takes the host's path (counted); the kernel may collect a
        # FAILED entry meanwhile (then it is asked again): wait for the count
        assert eventually(lambda: not session.exchange(0.5) and unreachable() > before, 20.0)
        assert f"{endpoint} does not answer" in lasthop_on.stderr
        ns_exec(fw3.ns, ["sysctl", "-q", "-w", f"{ignore_arp}=0"])
        # nothing sends to a marked endpoint any more: the host's entry stays
        # FAILED until something does (here a ping; one may go before fw3
        # answers again). A "used again" of the flush above does not count.
        used_again = f"endpoint {endpoint} is used again"
        seen = lasthop_on.stderr.count(used_again)

        def answers() -> bool:
            ns_exec(host.ns, ["ping", "-c1", "-W1", endpoint], check=False)
            return lasthop_on.stderr.count(used_again) > seen

        assert eventually(answers, 15.0)
        assert eventually(lambda: session.exchange(1.0), 15.0), (
            "the tunnel's hop was not used again"
        )


def test_an_endpoint_whose_route_goes_stops_its_entries_until_the_route_is_back(
    overlay_lab: Lab, lasthop_on: runner.AgentRunner
) -> None:
    """The host loses its route toward fw3's endpoint (an unreachable /32 over
    the underlay's connected /24: what an endpoint behind a router shows when
    its route goes; no neighbour entry fails, the kernel asks no one): the
    agent, following route changes, marks the endpoint unreachable and the
    next replies take the host's path (counted hop_unreachable) instead of the
    tunnel. The route is deleted again: the endpoint is used again and the
    connection works.

        cl3 ── fw3 ─ 10.255.0.3 ─ sw ─ up0 ─ vx0 ─ br0 ── vm1
                      host: unreachable 10.255.0.3/32 (then deleted)
    """
    plan = overlay_lab.plan
    host = plan.host
    endpoint = plan.firewall(3).endpoint

    def unreachable() -> int:
        return int(runner.stats(plan)["totals"].get("hop_unreachable", 0))

    with EchoSession(plan, client=3, vm=1) as session:
        assert session.exchange()
        before = unreachable()
        ip_batch(host.ns, [f"route add unreachable {endpoint}/32"])
        try:
            assert eventually(
                lambda: f"{endpoint} does not answer (no route)" in lasthop_on.stderr, 10.0
            )
            assert eventually(lambda: not session.exchange(0.5) and unreachable() > before, 20.0)
            assert f"{endpoint} does not answer (neighbour entry failed)" not in lasthop_on.stderr
        finally:
            ip_batch(host.ns, [f"route del unreachable {endpoint}/32"])
        assert eventually(lambda: f"endpoint {endpoint} is used again" in lasthop_on.stderr, 10.0)
        after = unreachable()
        assert eventually(lambda: session.exchange(1.0), 15.0), (
            "the tunnel's hop was not used again"
        )
        assert unreachable() == after, "a reply still took the host's path"


@pytest.mark.parametrize(
    ("kind", "argv", "expected"),
    [
        ("vxlan", ["type", "vxlan", "external", "dstport", "4789"], abi.LinkKind.VXLAN),
        ("vxlan", ["type", "vxlan", "id", "5", "remote", "192.0.2.1", "dstport", "4790"],
         abi.LinkKind.ETHERNET),
        ("geneve", ["type", "geneve", "external"], abi.LinkKind.GENEVE),
    ],
    ids=["vxlan external", "vxlan with its own remote", "geneve external"],
)  # fmt: skip
def test_the_agent_tells_an_external_tunnel_from_a_plain_link(
    kind: str, argv: list[str], expected: abi.LinkKind
) -> None:
    """link_kind: an external (collect-metadata) VXLAN or Geneve device is a
    tunnel uplink; a VXLAN device with its own remote forwards by MAC, so it is
    Ethernet to the data path. This kernel may lack the geneve module: skipped."""
    from lasthop.lab.namespaces import delete, ip_batch

    ns = f"lhkind{secrets.token_hex(2)}"
    ip_batch(None, [f"netns add {ns}"])
    try:
        made = subprocess.run(
            ["ip", "-n", ns, "link", "add", "tun0", *argv], capture_output=True, text=True
        )
        if made.returncode != 0:
            pytest.skip(
                f"no {kind} device here ({made.stderr.strip()}): the kernel lacks its module"
            )
        code = "from lasthop.links import Links; print(int(Links().by_name('tun0').kind))"
        out = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert abi.LinkKind(int(out)) == expected
    finally:
        delete([ns])
