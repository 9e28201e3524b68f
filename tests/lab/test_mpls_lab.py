"""An MPLS-labelled uplink end to end: requests arrive under two labels from a
label-edge router (MplsPeer: the kernel here routes no MPLS, so a thread
pushes and pops the labels), the VM's routing sends its replies to its
default gateway, a firewall that never saw the connection -- and lasthop
sends them back under the same labels.

    client ns            ler ns                  host ns (routed)
    (198.51.100.20)
      ler0 (tun) <== MplsPeer ==> eth0 ── veth ── mpls0 [XDP lh_uplink_mpls, tc lh_uplink]
          push 16001/24002,     Ether/MPLS/IP     vm1 192.0.2.1 [lh_vmport] ── vm ns (echo)
          check + pop                             fw0 10.98.0.1 [lh_uplink] ── fw ns (drops)
                                                  route 198.51.100.0/24 via fw0 (the VM's way)

Without lasthop the request dies at the host (no MPLS routing) and the VM's
way back is the firewall; with it, the echo comes back, each reply under the
labels the request came with, the bottom-of-stack bit on the last, every
label's TTL the IP TTL (one less than the VM's: the host routed it).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from test_l3_lab import Echo  # the same echo service, in our VM namespace
from test_l3_lab import echoed as l3_echoed

from lasthop.lab import runner
from lasthop.lab.mplspeer import MplsPeer
from lasthop.lab.namespaces import delete, existing, ip_batch, run, sysctl
from lasthop.lab.tunlink import TunEnd

needs_agent = pytest.mark.skipif(not runner.available(), reason="agent not built yet")
pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.bpf, needs_agent]

CLIENT_NS, LER, HOST, VM, FW = "lhmp-client", "lhmp-ler", "lhmp-host", "lhmp-vm", "lhmp-fw"
CLIENT = {4: "198.51.100.20", 6: "2001:db8:100::20"}
VM_ADDR = {4: "192.0.2.11", 6: "2001:db8:2::11"}
LABELS = (16001, 24002)  # transport, VPN: what the reply must carry back
MAC_LER = "02:fa:00:00:00:4c"
MAC_MPLS0 = "02:00:00:00:01:47"


def build() -> None:
    for ns in (CLIENT_NS, LER, HOST, VM, FW):
        ip_batch(None, [f"netns add {ns}"])
    ip_batch(None, [
        f"link add mpls0 netns {HOST} type veth peer name eth0 netns {LER}",
        f"link add vm1 netns {HOST} type veth peer name eth0 netns {VM}",
        f"link add fw0 netns {HOST} type veth peer name eth0 netns {FW}",
    ])  # fmt: skip
    for ns in (CLIENT_NS, LER, HOST, VM, FW):
        sysctl(ns, {"net.ipv6.conf.all.accept_dad": 0, "net.ipv6.conf.default.accept_dad": 0})
    sysctl(LER, {"net.ipv6.conf.all.disable_ipv6": 1})  # its eth0 only carries the peer's frames
    sysctl(HOST, {
        "net.ipv4.ip_forward": 1, "net.ipv6.conf.all.forwarding": 1,
        # requests from the client arrive on mpls0, yet the route back is via fw0
        "net.ipv4.conf.all.rp_filter": 0, "net.ipv4.conf.default.rp_filter": 0,
    })  # fmt: skip
    ip_batch(LER, [f"link set eth0 address {MAC_LER}", "link set eth0 up"])
    ip_batch(VM, [
        "link set lo up", "link set eth0 up",
        "addr add 192.0.2.11/24 dev eth0", "addr add 2001:db8:2::11/64 dev eth0 nodad",
        "route add default via 192.0.2.1", "route add default via 2001:db8:2::1",
    ])  # fmt: skip
    ip_batch(FW, ["link set lo up", "link set eth0 up", "addr add 10.98.0.2/30 dev eth0",
                  "addr add fd98::2/64 dev eth0 nodad"])  # fmt: skip
    ip_batch(HOST, [
        "link set lo up", f"link set mpls0 address {MAC_MPLS0}",
        "link set mpls0 up", "link set vm1 up", "link set fw0 up",
        "addr add 10.97.0.1/30 dev mpls0", "addr add fd97::1/64 dev mpls0 nodad",
        "addr add 192.0.2.1/24 dev vm1", "addr add 2001:db8:2::1/64 dev vm1 nodad",
        "addr add 10.98.0.1/30 dev fw0", "addr add fd98::1/64 dev fw0 nodad",
        "route add 198.51.100.0/24 via 10.98.0.2", "route add 2001:db8:100::/64 via fd98::2",
    ])  # fmt: skip


def address_client() -> None:
    ip_batch(CLIENT_NS, [
        "link set lo up", "link set ler0 up",
        "addr add 198.51.100.20/32 dev lo", "addr add 2001:db8:100::20/128 dev lo nodad",
        "route add 192.0.2.0/24 dev ler0 src 198.51.100.20",
        "route add 2001:db8:2::/64 dev ler0 src 2001:db8:100::20",
    ])  # fmt: skip


@pytest.fixture(scope="module")
def mpls_lab() -> Iterator[MplsPeer]:
    leftover = [n for n in (CLIENT_NS, LER, HOST, VM, FW) if n in existing()]
    delete(leftover)
    try:
        build()
        with MplsPeer(
            TunEnd(CLIENT_NS, "ler0"),
            LER,
            "eth0",
            mac=bytes.fromhex(MAC_LER.replace(":", "")),
            host_mac=bytes.fromhex(MAC_MPLS0.replace(":", "")),
            labels=LABELS,
        ) as peer:
            address_client()
            yield peer
    finally:
        delete([CLIENT_NS, LER, HOST, VM, FW])


def echoed(family: int, tries: int = 20) -> bool:
    """Whether a UDP datagram from the client behind the label-edge router to
    the VM comes back (test_l3_lab's echo check, this lab's addresses)."""
    return l3_echoed(family, tries, ns=CLIENT_NS, client=CLIENT, vm=VM_ADDR)


CONFIG = """routed = true
[[uplink]]
name = "mpls0"
mpls = true
[[uplink]]
name = "fw0"
[[vm_port]]
name = "vm1"
"""


def xdp_program(ns: str, dev: str) -> str | None:
    """The name of the XDP program on *dev* (native or generic), or None."""
    out = json.loads(run(["ip", "-n", ns, "-j", "-d", "link", "show", "dev", dev]).stdout)
    xdp = out[0].get("xdp")
    if not xdp:
        return None
    prog = xdp.get("prog") or next((a["prog"] for a in xdp.get("attached", []) if "prog" in a), {})
    return prog.get("name")


@pytest.mark.parametrize("family", [4, 6])
def test_replies_go_back_under_the_labels(mpls_lab: MplsPeer, family: int, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Without lasthop no echo comes back; with lasthop every echo does, each
    reply under the request's labels with S and TTL right, and `show` names
    the stack."""
    echo = Echo(VM)
    config = tmp_path / "lasthop.toml"
    config.write_text(CONFIG)
    try:
        assert not echoed(family, tries=4), "answered without lasthop: the lab proves nothing"
        mpls_lab.received.clear()
        agent = runner.AgentProcess(
            runner.lasthop_argv("run", "--config", str(config), "--netns", HOST),
            tmp_path / "lasthop.log",
        )
        agent.start()
        try:
            assert xdp_program(HOST, "mpls0") == "lh_uplink_mpls"
            assert echoed(family), agent.stderr[-2000:]
            assert mpls_lab.received, "no labelled reply reached the peer"
            assert {c.labels for c in mpls_lab.received} == {LABELS}
            assert all(c.ok for c in mpls_lab.received), mpls_lab.received
            shown = json.loads(run(runner.lasthop_argv("show", "--netns", HOST, "--json")).stdout)
            mine = [e for e in shown if e["dst"] == VM_ADDR[family]]
            assert [(e["uplink"], e["mpls"]) for e in mine] == [("mpls0", list(LABELS))]
        finally:
            agent.stop()
            run(runner.lasthop_argv("detach", "--netns", HOST))
        assert xdp_program(HOST, "mpls0") is None  # detach takes the XDP program off too
    finally:
        echo.close()
