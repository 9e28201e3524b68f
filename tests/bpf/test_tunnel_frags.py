"""ICMP errors and fragments on tunnel, MPLS and L3 uplinks (issue 9, item 6),
through BPF_PROG_TEST_RUN: every packet of a connection follows it, whatever
the routing interface its last hop is on.

    an error from beyond the firewall, quoting VM 1's reply:
      fw B ─ VXLAN (inner frame) ─────────▶ up1 [lh_uplink] ─────────────▶ vm1
      fw B ─ MPLS ─ up1 [XDP: labels off] ─▶ up1 [lh_uplink] ─────────────▶ vm1

    VM 1's fragmented reply (ports in the first fragment only):
      vm1 [lh_vmport] ─ first: its entry ──┬─ VXLAN hop: dst MAC, tunnel key ──▶ up1
                      ─ later: lh_frags ───┼─ MPLS hop: dst MAC, labels pushed ─▶ up1
                        (a copy of the     └─ L3 link: TTL - 1 (the kernel takes
                         entry: its hop id)     the MAC header off on redirect) ─▶ up1

Test run cannot give a frame tunnel metadata (only let a program set it), nor
a tc program XDP's metadata: an error's way needs neither (it is keyed by its
quote, and never learns), so it runs here on a VXLAN or MPLS uplink as the
inner / popped frame; a tunnel reply's key is metadata, so a VXLAN row checks
the bytes (the destination MAC), the redirect and `encap_redirected`. What a
request brings (tunnel key, labels) is the labs' (tests/lab/test_tunnel_pmtu_lab.py)
and the veth tests' below.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6, IPv6ExtHdrFragment
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from lasthop import abi, libbpf
from lasthop.datapath import hop_desc_hash
from lasthop.lab.tunlink import IFF_NO_PI, IFF_TUN, TUNSETIFF
from lasthop.libbpf import INGRESS, TcHook
from packets import (
    IP6_CLIENT_B,
    IP6_ROUTER,
    IP6_VM_1,
    IP_CLIENT_B,
    IP_ROUTER,
    IP_VM_1,
    MAC_FW_A,
    MAC_FW_B,
    MAC_UPLINK_1,
    MAC_VM_1,
    MAC_VMPORT_1,
    MPLS_LABEL_A,
    MPLS_LABEL_B,
    PORT_CLIENT,
    PORT_DNS,
    l3,
    labelled,
    lse,
    tcp4_reply,
    tcp4_request,
    tcp6_reply,
    tcp6_request,
    udp4_fragments,
    udp4_reply,
    udp4_request,
    udp6_fragments,
    udp6_request,
)

from .harness import (
    HOP,
    MARKS,
    ST,
    TC_ACT_OK,
    TC_ACT_REDIRECT,
    UPLINK,
    VMPORT,
    C,
    Case,
    Datapath,
    Entry,
    HopSlots,
    Key,
    bridged,
    check,
    routed,
)
from .test_encap import desc4
from .test_frag import run_later
from .test_mpls import desc, meta, run_xdp, ttl
from .test_uplink_icmp import frag_needed, held, to_vm, too_big
from .test_veth import Capture

pytestmark = MARKS

K = abi.LinkKind
EXT = abi.F_ENTRY_HOP_EXT
HOP_ID = 0x00050006  # any id: a reply reads the one its entry names
A60, B60 = lse(MPLS_LABEL_A), lse(MPLS_LABEL_B)


def hop_setup(kind: abi.LinkKind, hop: abi.HopDesc | None, entries: tuple[Entry, ...]
              ) -> Callable[[Datapath], None]:  # fmt: skip
    """The set-up after a case's own: up1's link kind, the descriptor under
    HOP_ID, and HOP_ID in the tags' place of each of *entries* (written by
    the case with F_ENTRY_HOP_EXT, no tags)."""

    def extra(dp: Datapath) -> None:
        key = dp.ifaces["up1"].ifindex.to_bytes(4, "little")
        cfg = abi.IfaceCfg.from_buffer_copy(dp.iface_map.lookup(key))
        cfg.link_kind = int(kind)
        dp.iface_map.update(key, bytes(cfg))
        if hop is not None:
            HopSlots(dp.obj.map("lh_hop_descs")).update(HOP_ID.to_bytes(4, "little"), bytes(hop))
        for entry in entries:
            table, k = dp.tables[entry.table], entry.key.pack()
            e = abi.ConnEntry.from_buffer_copy(table.lookup(k)[: ctypes.sizeof(abi.ConnEntry)])
            e.vlan_tci[0], e.vlan_tci[1] = HOP_ID & 0xFFFF, HOP_ID >> 16
            table.update(k, bytes(e))

    return extra


# ------------------------------------------------- ICMP errors from outside


REQ4, REQ6 = tcp4_request("A"), tcp6_request("A")
TUNNELLED = HOP | EXT


@dataclass(frozen=True)
class ErrorRow:
    """An error arriving on up1 (of *kind*) about a connection whose last hop
    is a descriptor (VXLAN endpoint, MPLS stack)."""

    case: Case
    kind: abi.LinkKind
    hop: abi.HopDesc

    def __str__(self) -> str:
        return self.case.desc


def error_row(desc_: str, kind: abi.LinkKind, hop: abi.HopDesc, entry: Entry, error: Packet,
              counter: abi.Counter = C.ICMP_ERROR_REDIRECTED) -> ErrorRow:  # fmt: skip
    to_vm_ = counter == C.ICMP_ERROR_REDIRECTED
    return ErrorRow(
        Case(
            desc_,
            UPLINK,
            "up1",
            error,
            setup=(entry,),
            vm_macs=(("vm1", MAC_VM_1),),
            verdict=TC_ACT_REDIRECT if to_vm_ else TC_ACT_OK,
            redirect="vm1" if to_vm_ else None,
            output=to_vm(error) if to_vm_ else None,
            counters={("up1", counter): 1},
        ),
        kind,
        hop,
    )


def ptb_about(fragment: Packet) -> Packet:
    """A router's "packet too big" about a fragment VM 1 sent (a service's
    answer: to its address), quoting as much as fits in 1280 bytes."""
    quote = bytes(l3(fragment))[: 1280 - 48]
    return (
        Ether(src=MAC_FW_B, dst=MAC_UPLINK_1)
        / IPv6(src=IP6_ROUTER, dst=IP6_VM_1)
        / ICMPv6PacketTooBig(mtu=1280)
        / Raw(quote)
    )


V4_HOP, V6_HOP = desc4(), desc4(endpoint=0xC0000202, vni=200)
MPLS_HOP = desc(A60, B60)
SERVICE4 = held(REQ4, flags=TUNNELLED)
SERVICE6 = held(REQ6, flags=TUNNELLED)
OPENED4 = held(REQ4, flags=TUNNELLED | abi.F_ENTRY_VM_ORIGIN)
FAST4 = held(REQ4, flags=TUNNELLED | abi.F_ENTRY_VM_FAST)
UDP4 = held(udp4_request(), flags=TUNNELLED, state=ST.UDP_STREAM)
UDP6 = held(udp6_request(), flags=TUNNELLED, state=ST.UDP_STREAM)
LEARNED4 = Entry(Key(REQ4), mac=MAC_FW_B, iface="up1", flags=TUNNELLED, packets=3,
                 state=ST.TCP_ESTABLISHED)  # fmt: skip

ERROR_ROWS = [
    error_row("VXLAN: v4 fragmentation needed about a service's reply goes to its VM",
              K.VXLAN, V4_HOP, SERVICE4, frag_needed(tcp4_reply(), dst_mac=MAC_UPLINK_1)),
    error_row("VXLAN: v6 packet too big about a service's reply goes to its VM",
              K.VXLAN, V6_HOP, SERVICE6, too_big(tcp6_reply(), dst_mac=MAC_UPLINK_1)),
    error_row("VXLAN: fragmentation needed about a connection the VM opened goes to it",
              K.VXLAN, V4_HOP, OPENED4, frag_needed(tcp4_reply())),
    error_row("VXLAN: fragmentation needed about a fast-path connection goes to its VM",
              K.VXLAN, V4_HOP, FAST4, frag_needed(tcp4_reply())),
    error_row("VXLAN: a UDP connection's error too", K.VXLAN, V4_HOP, UDP4,
              frag_needed(udp4_reply())),
    error_row("VXLAN: about a connection no VM port holds: left to the bridge, counted",
              K.VXLAN, V4_HOP, LEARNED4, frag_needed(tcp4_reply()), C.ICMP_ERROR_FORWARDED),
    error_row("VXLAN: a quote cut inside its L4 header: passed unchanged, counted",
              K.VXLAN, V4_HOP, SERVICE4,
              Ether(src=MAC_FW_B, dst=MAC_VM_1) / IP(src=IP_ROUTER, dst=IP_VM_1)
              / ICMP(type=3, code=4, nexthopmtu=1400) / Raw(bytes(l3(tcp4_reply()))[:24]),
              C.ICMP_ERROR_MISS),
    error_row("VXLAN: packet too big about a v6 reply's first fragment: its ports name it",
              K.VXLAN, V6_HOP, UDP6, ptb_about(udp6_fragments()[0])),
    error_row("VXLAN: packet too big about a later v6 fragment (no ports): passed, counted",
              K.VXLAN, V6_HOP, UDP6, ptb_about(udp6_fragments()[1]), C.ICMP_ERROR_MISS),
    error_row("MPLS (labels popped): v4 fragmentation needed about a service's reply",
              K.MPLS, MPLS_HOP, SERVICE4, ttl(frag_needed(tcp4_reply(), MAC_UPLINK_1), 60)),
    error_row("MPLS (labels popped): v6 packet too big about a service's reply",
              K.MPLS, MPLS_HOP, SERVICE6, ttl(too_big(tcp6_reply(), MAC_UPLINK_1), 60)),
    error_row("MPLS (labels popped): an error about a connection the VM opened goes to it",
              K.MPLS, MPLS_HOP, OPENED4, ttl(frag_needed(tcp4_reply()), 60)),
    error_row("MPLS (labels popped): an error about a fast-path connection goes to its VM",
              K.MPLS, MPLS_HOP, FAST4, ttl(frag_needed(tcp4_reply()), 60)),
    error_row("MPLS (labels popped): about a connection no VM port holds: left to routing",
              K.MPLS, MPLS_HOP, LEARNED4, ttl(frag_needed(tcp4_reply()), 60),
              C.ICMP_ERROR_FORWARDED),
]  # fmt: skip


@pytest.mark.parametrize("row", ERROR_ROWS, ids=str)
def test_an_error_from_beyond_a_tunnel_reaches_the_vm(dp: Datapath, descs: HopSlots,
                                                      row: ErrorRow) -> None:  # fmt: skip
    """The error is keyed by its quote (VM 1's reply as it left, before any
    encapsulation): it goes to the VM port that holds the connection, as the
    bridge would give it (the guest's MAC, untagged, unlabelled), and changes
    no entry; the tunnel's inner frame needs no tunnel key for that."""
    check(dp, row.case, hop_setup(row.kind, row.hop, row.case.setup))


def time_exceeded_about(fragment: Packet) -> Packet:
    """A router's "time exceeded" about a fragment VM 1 sent: its IP header
    and 8 bytes (RFC 792), from beyond fw B."""
    return (
        Ether(src=MAC_FW_B, dst=MAC_UPLINK_1)
        / IP(src=IP_ROUTER, dst=IP_VM_1)
        / ICMP(type="time-exceeded", code=0)
        / Raw(bytes(l3(fragment))[:28])
    )


@pytest.mark.parametrize(
    ("frags", "entry", "about"),
    [(udp6_fragments(), UDP6, ptb_about), (udp4_fragments(), UDP4, time_exceeded_about)],
    ids=["v6 packet too big", "v4 time exceeded"],
)
def test_an_error_about_a_later_fragment_reaches_the_vm_its_first_came_from(
    dp: Datapath, descs: HopSlots, frags: list[Packet], entry: Entry, about: Callable
) -> None:  # type: ignore[type-arg]
    """A service's answer left in fragments (the first by its entry, into the
    tunnel); an error quoting a later one -- no ports -- finds the VM port
    through lh_frags' copy of the entry, as the later fragment itself did."""
    first = Case(
        "the answer's first fragment",
        VMPORT,
        "vm1",
        frags[0],
        setup=(entry,),
        vm_macs=(("vm1", MAC_VM_1),),
        verdict=TC_ACT_REDIRECT,
        redirect="up1",
        output=bridged(frags[0]),
        after=(entry.but(replies=1, seen="now"),),
        counters={("vm1", C.REDIRECTED): 1, ("vm1", C.ENCAP_REDIRECTED): 1},
    )
    check(dp, first, hop_setup(K.VXLAN, V6_HOP, (entry,)))
    error = about(frags[1])
    verdict, data, counters = run_later(dp, UPLINK, "up1", error)
    assert (verdict, dp.redirected_to()) == (TC_ACT_REDIRECT, "vm1")
    assert data.hex() == bytes(to_vm(error)).hex()
    assert counters == {("up1", C.ICMP_ERROR_REDIRECTED): 1}


@pytest.mark.parametrize(
    ("error", "entry"),
    [(frag_needed(tcp4_reply(), MAC_UPLINK_1), SERVICE4),
     (too_big(tcp6_reply(), MAC_UPLINK_1), SERVICE6)],
    ids=["v4 fragmentation needed", "v6 packet too big"],
)  # fmt: skip
def test_an_error_under_labels_is_popped_then_reaches_the_vm(
    dp: Datapath, descs: HopSlots, error: Packet, entry: Entry
) -> None:
    """XDP takes the labels off the error (into the metadata; its IP TTL the
    top label's) exactly as off a request; tc then sends the popped frame to
    the VM that holds the connection."""
    hop_setup(K.MPLS, MPLS_HOP, ())(dp)
    before = dp.counter_values()
    run = run_xdp(dp, bytes(labelled(error, (A60, B60))))
    assert run.data.hex() == (meta(A60, B60) + bytes(ttl(error, 60))).hex()
    after = dp.counter_values()
    assert {k: after[k] - before[k] for k in after if after[k] != before[k]} == {
        ("up1", C.MPLS_POPPED): 1
    }
    case = error_row("popped", K.MPLS, MPLS_HOP, entry, ttl(error, 60)).case
    check(dp, case, hop_setup(K.MPLS, MPLS_HOP, (entry,)))


def test_a_labelled_error_cut_short_passes_unchanged_counted(dp: Datapath) -> None:
    """An error whose IP header ends under its labels: XDP leaves it as it
    came (mpls_malformed); nothing is sent anywhere."""
    hop_setup(K.MPLS, None, ())(dp)
    frame = bytes(labelled(frag_needed(tcp4_reply(), MAC_UPLINK_1), (A60, B60)))[: 14 + 8 + 12]
    before = dp.counter_values()
    run = run_xdp(dp, frame)
    assert run.data == frame
    after = dp.counter_values()
    assert {k: after[k] - before[k] for k in after if after[k] != before[k]} == {
        ("up1", C.MPLS_MALFORMED): 1
    }


# ------------------------------------------------- reply fragments, each hop kind


def l3_out(frame: Packet) -> Packet:
    """A reply into an L3 link as test run shows it: TTL - 1, the MACs as
    they were (the kernel takes the header off on the redirect)."""
    e = Ether(bytes(frame))
    return routed(frame, src=e.src, dst=e.dst)


def ip_ttl(frame: Packet) -> int:
    e = Ether(bytes(frame))
    return int(e[IP].ttl) if IP in e else int(e[IPv6].hlim)


def mpls_out(frame: Packet) -> Packet:
    """Bridged, under the two labels of MPLS_HOP, their TTLs the IP TTL."""
    t = ip_ttl(frame)
    return labelled(bridged(frame), (lse(MPLS_LABEL_A, t), lse(MPLS_LABEL_B, t)))


def mpls_routed_out(frame: Packet) -> Packet:
    out = routed(frame)
    t = ip_ttl(out)
    return labelled(out, (lse(MPLS_LABEL_A, t), lse(MPLS_LABEL_B, t)))


@dataclass(frozen=True)
class Hop:
    """A kind of last hop and what a reply frame becomes on its way to it."""

    name: str
    kind: abi.LinkKind
    desc: abi.HopDesc | None  # None: no descriptor (an L3 link is its own hop)
    out: Callable[[Packet], Packet]
    routed: bool = False

    @property
    def flags(self) -> int:
        return HOP | (EXT if self.desc is not None else 0)

    @property
    def encap(self) -> dict[tuple[str, abi.Counter], int]:
        return {("vm1", C.ENCAP_REDIRECTED): 1} if self.desc is not None else {}


HOPS = [
    Hop("VXLAN endpoint, IPv4", K.VXLAN, desc4(), bridged),
    Hop("VXLAN endpoint, IPv6 underlay", K.VXLAN, V6_HOP, bridged),
    Hop("MPLS stack", K.MPLS, MPLS_HOP, mpls_out),
    Hop("MPLS stack, routed host", K.MPLS, MPLS_HOP, mpls_routed_out, routed=True),
    Hop("L3 link", K.L3, None, l3_out),
]


def reply_fragments(family: int, hop: Hop) -> list[Packet]:
    mac = MAC_VMPORT_1 if hop.routed else MAC_FW_A
    return udp4_fragments(dst_mac=mac) if family == 4 else udp6_fragments(dst_mac=mac)


def answered(first: Packet, hop: Hop) -> Entry:
    """A client's UDP connection to VM 1 whose request came by *hop*."""
    mac = "00:00:00:00:00:00" if hop.kind == K.L3 else MAC_FW_B
    return Entry(Key(first, reverse=True), mac=mac, iface="up1", flags=hop.flags, packets=3,
                 state=ST.UDP_STREAM)  # fmt: skip


def first_fragment_case(frags: list[Packet], hop: Hop) -> Case:
    entry = answered(frags[0], hop)
    return Case(
        f"first fragment, {hop.name}",
        VMPORT,
        "vm1",
        frags[0],
        setup=(entry,),
        routed=hop.routed,
        verdict=TC_ACT_REDIRECT,
        redirect="up1",
        output=hop.out(frags[0]),
        after=(entry.but(replies=1, seen="now"),),
        counters={("vm1", C.REDIRECTED): 1, **hop.encap},
    )


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("hop", HOPS, ids=[h.name for h in HOPS])
def test_every_reply_fragment_goes_by_the_connections_hop(
    dp: Datapath, descs: HopSlots, hop: Hop, family: int
) -> None:
    """The first fragment (its ports find the entry) and each later one (no
    ports: lh_frags' copy of the entry) come out alike: the same rewrite,
    the same tunnel key or labels, the same L3 link."""
    frags = reply_fragments(family, hop)
    assert len(frags) >= 2
    case = first_fragment_case(frags, hop)
    check(dp, case, hop_setup(hop.kind, hop.desc, case.setup))
    for frame in frags[1:]:
        verdict, data, counters = run_later(dp, VMPORT, "vm1", frame)
        assert (verdict, dp.redirected_to()) == (TC_ACT_REDIRECT, "up1")
        assert data.hex() == bytes(hop.out(frame)).hex()
        assert counters == {("vm1", C.FRAGMENT_FOLLOWED): 1, **hop.encap}


def test_a_later_fragment_whose_descriptor_went_passes_counted(
    dp: Datapath, descs: HopSlots
) -> None:
    """The hop's descriptor is swept between the first fragment and the next
    (no entry names it any more): the later fragment passes unchanged,
    counted hop_desc_gone, as a reply of that entry would."""
    hop = HOPS[0]
    frags = reply_fragments(4, hop)
    case = first_fragment_case(frags, hop)
    check(dp, case, hop_setup(hop.kind, hop.desc, case.setup))
    descs.delete(HOP_ID.to_bytes(4, "little"))
    verdict, data, counters = run_later(dp, VMPORT, "vm1", frags[1])
    assert (verdict, data) == (TC_ACT_OK, bytes(frags[1]))
    assert dp.redirected_to() is None
    assert counters == {("vm1", C.HOP_DESC_GONE): 1}


def _v4_fragment(payload: bytes, offset: int, more: bool) -> Packet:
    flags = "MF" if more else 0
    return (
        Ether(src=MAC_VM_1, dst=MAC_FW_A)
        / IP(src=IP_VM_1, dst=IP_CLIENT_B, id=0x5151, proto=17, flags=flags, frag=offset)
        / Raw(payload)
    )


MALFORMED = [
    ("a later v4 fragment whose IP total length runs past the frame",
     Ether(bytes(udp4_fragments()[1])[: 14 + 20 + 16])),
    ("a later v6 fragment whose payload length runs past the frame",
     Ether(bytes(udp6_fragments()[1])[: 14 + 40 + 8 + 8])),
    ("a v6 fragment header cut short", Ether(
        bytes(Ether(src=MAC_VM_1, dst=MAC_FW_A) / IPv6(src=IP6_VM_1, dst=IP6_CLIENT_B,
                                                       nh=44, plen=4)
              / Raw(bytes(IPv6ExtHdrFragment(offset=10, m=1))[:4])))),
]  # fmt: skip


@pytest.mark.parametrize("frame", [m[1] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_a_malformed_later_fragment_of_a_tunnelled_reply_passes_counted(
    dp: Datapath, descs: HopSlots, frame: Packet
) -> None:
    """After the first fragment went into the tunnel, a later one the parser
    cannot read is neither followed nor changed: passed, counted malformed."""
    hop = HOPS[0]
    frags = reply_fragments(4, hop)
    case = first_fragment_case(frags, hop)
    check(dp, case, hop_setup(hop.kind, hop.desc, case.setup))
    verdict, data, counters = run_later(dp, VMPORT, "vm1", frame)
    assert (verdict, data, dp.redirected_to()) == (TC_ACT_OK, bytes(frame), None)
    assert counters == {("vm1", C.MALFORMED): 1}


def test_the_later_fragments_of_a_first_one_too_short_for_its_ports_pass(
    dp: Datapath, descs: HopSlots
) -> None:
    """A first fragment holding 4 bytes of its UDP header cannot name the
    connection: it passes (malformed), nothing is remembered, and its later
    fragments pass unchanged (fragment_early) -- none goes into the tunnel."""
    hop = HOPS[2]
    frags = reply_fragments(4, hop)
    entry = answered(frags[0], hop)
    case = Case(
        "first fragment, 4 bytes of UDP",
        VMPORT,
        "vm1",
        _v4_fragment(bytes(UDP(sport=PORT_DNS, dport=PORT_CLIENT))[:4], 0, True),
        setup=(entry,),
        counters={("vm1", C.MALFORMED): 1},
    )
    check(dp, case, hop_setup(hop.kind, hop.desc, case.setup))
    later = _v4_fragment(b"B" * 64, 1, False)
    verdict, data, counters = run_later(dp, VMPORT, "vm1", later)
    assert (verdict, data, dp.redirected_to()) == (TC_ACT_OK, bytes(later), None)
    assert counters == {("vm1", C.FRAGMENT_EARLY): 1}


# ------------------------------------------------- request fragments under labels: XDP


@pytest.mark.parametrize("family", [4, 6])
def test_xdp_takes_the_labels_off_every_fragment_of_a_request(dp: Datapath, family: int) -> None:
    """The first fragment and the later ones (no ports) alike: labels into
    the metadata, the IP TTL the top label's; tc then learns the first and
    sends the later ones after it (the veth test below)."""
    hop_setup(K.MPLS, None, ())(dp)
    for frame in request_fragments(family):
        before = dp.counter_values()
        run = run_xdp(dp, bytes(labelled(frame, (A60, B60))))
        assert run.data.hex() == (meta(A60, B60) + bytes(ttl(frame, 60))).hex()
        after = dp.counter_values()
        assert {k: after[k] - before[k] for k in after if after[k] != before[k]} == {
            ("up1", C.MPLS_POPPED): 1
        }


# ------------------------------------------------- on devices: a tun (L3), a veth with XDP (MPLS)
#
# Test run gives lh_uplink_l3 an Ethernet header and lh_uplink no XDP
# metadata, so these two run on devices: packets written into a tun device
# (lh_uplink_l3 on its ingress), labelled frames sent into up1 (XDP pops,
# tc learns); what reaches VM 1 is read at vm1's peer.

SLOT_TUN = 5  # tun0's counter slot (the topology's are 1-4)
TC_HANDLE, TC_PRIORITY = 1, 1


@pytest.fixture
def tun(dp: Datapath) -> Iterator[tuple[int, int]]:
    """tun0, an L3 uplink (lh_uplink_l3 on its ingress, slot SLOT_TUN), in
    the test namespace: its fd and ifindex. Closing the fd removes it (and
    its qdisc and filter)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    index = 0
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", b"tun0", IFF_TUN | IFF_NO_PI))
        subprocess.run(["ip", "link", "set", "tun0", "up"], check=True)
        index = socket.if_nametoindex("tun0")
        cfg = abi.IfaceCfg(role=int(abi.Role.UPLINK), slot=SLOT_TUN, link_kind=int(K.L3))
        dp.iface_map.update(index.to_bytes(4, "little"), bytes(cfg))
        hook = TcHook(index, INGRESS)
        hook.create()
        hook.attach(dp.obj.program("lh_uplink_l3").fd, handle=TC_HANDLE, priority=TC_PRIORITY)
        yield fd, index
    finally:
        os.close(fd)
        if index:
            dp.iface_map.update(index.to_bytes(4, "little"), bytes(abi.IfaceCfg()))  # an array


def slot_counts(dp: Datapath, slot: int) -> dict[abi.Counter, int]:
    out = {}
    for c in abi.Counter:
        raw = dp.counters.lookup(abi.counter_key(slot, c))
        assert raw is not None
        out[c] = sum(int.from_bytes(v[:8], "little") for v in dp.counters.percpu_values(raw))
    return out


def moved_by(before: dict[abi.Counter, int], after: dict[abi.Counter, int]) -> dict:  # type: ignore[type-arg]
    return {c: after[c] - before[c] for c in after if after[c] != before[c]}


def to_vm_from_l3(packet: Packet) -> bytes:
    """A packet of an L3 link as VM 1 gets it: an Ethernet header from its
    port's MAC to the guest's in front, TTL - 1 (the host routes it)."""
    frame = Ether(src=MAC_VMPORT_1, dst=MAC_VM_1) / l3(packet)
    return bytes(routed(frame, src=MAC_VMPORT_1, dst=MAC_VM_1))


def pin_to_vm1(dp: Datapath, request: Packet, ifindex: int, flags: int = HOP,
               hop_id: int = 0) -> None:  # fmt: skip
    """A service connection pinned to vm1 whose last hop is uplink *ifindex*."""
    e = dp.pack_entry(Entry(Key(request), vm="vm1", flags=flags, packets=3, state=ST.UDP_STREAM))
    e.ifindex = ifindex
    if hop_id:
        e.vlan_tci[0], e.vlan_tci[1] = hop_id & 0xFFFF, hop_id >> 16
        e.mac[:] = list(bytes.fromhex(MAC_FW_B.replace(":", "")))
    dp.tables["confirmed"].update(Key(request).pack(), bytes(e))


@pytest.mark.parametrize(
    ("error", "request_"),
    [(frag_needed(tcp4_reply()), REQ4), (too_big(tcp6_reply()), REQ6)],
    ids=["v4 fragmentation needed", "v6 packet too big"],
)
def test_an_error_from_beyond_an_l3_link_reaches_the_services_vm(
    dp: Datapath, tun: tuple[int, int], error: Packet, request_: Packet
) -> None:
    """An error written into the tun (the L3 peer's side) about a service's
    reply reaches vm1 with an Ethernet header pushed and TTL - 1: the host's
    routing would send it to the service's address, not to the VM."""
    fd, index = tun
    dp.configure("vm1", vm_mac=MAC_VM_1)
    pin_to_vm1(dp, request_, index, flags=HOP)
    capture = Capture("vm1p")
    try:
        before = slot_counts(dp, SLOT_TUN)
        os.write(fd, bytes(l3(error)))
        capture.expect(to_vm_from_l3(error), timeout=5.0)
    finally:
        capture.close()
    assert moved_by(before, slot_counts(dp, SLOT_TUN)) == {C.ICMP_ERROR_REDIRECTED: 1}


@pytest.mark.parametrize("family", [4, 6])
def test_every_request_fragment_through_an_l3_link_reaches_the_services_vm(
    dp: Datapath, tun: tuple[int, int], family: int
) -> None:
    """The first fragment finds the service's entry (pinned to vm1); the
    later ones, without ports, follow it: each reaches vm1 framed, TTL - 1."""
    fd, index = tun
    frags = request_fragments(family)
    dp.configure("vm1", vm_mac=MAC_VM_1)
    pin_to_vm1(dp, frags[0], index, flags=HOP)
    capture = Capture("vm1p")
    try:
        before = slot_counts(dp, SLOT_TUN)
        for frame in frags:
            os.write(fd, bytes(l3(frame)))
            capture.expect(to_vm_from_l3(frame), timeout=5.0)
    finally:
        capture.close()
    assert moved_by(before, slot_counts(dp, SLOT_TUN)) == {
        C.REFRESHED: 1,
        C.SVC_PINNED: 1,
        C.FRAGMENT_FOLLOWED: len(frags) - 1,
    }


def request_fragments(family: int) -> list[Packet]:
    """A client's fragmented UDP request through firewall B, to VM 1."""
    if family == 4:
        return udp4_fragments(src=IP_CLIENT_B, dst=IP_VM_1, sport=PORT_CLIENT, dport=PORT_DNS,
                              src_mac=MAC_FW_B, dst_mac=MAC_VM_1)  # fmt: skip
    return udp6_fragments(src=IP6_CLIENT_B, dst=IP6_VM_1, sport=PORT_CLIENT, dport=PORT_DNS,
                          src_mac=MAC_FW_B, dst_mac=MAC_VM_1)  # fmt: skip


@pytest.mark.parametrize("family", [4, 6])
def test_every_labelled_request_fragment_reaches_the_services_vm(
    dp: Datapath, descs: HopSlots, family: int
) -> None:
    """Through up1 with XDP (generic) and tc: every fragment loses its labels;
    the first one's stack is the entry's hop (the same descriptor), so it
    goes to the service's VM, and the later ones follow it -- unlabelled,
    to the guest's MAC, their IP TTL the top label's."""
    up1 = dp.ifaces["up1"].ifindex
    hop = desc(A60, B60)
    hop_id = hop_desc_hash(hop)
    descs.update(hop_id.to_bytes(4, "little"), bytes(hop))
    frags = request_fragments(family)
    dp.configure("vm1", vm_mac=MAC_VM_1)
    pin_to_vm1(dp, frags[0], up1, flags=HOP | EXT, hop_id=hop_id)
    hop_setup(K.MPLS, None, ())(dp)
    tc = TcHook(up1, INGRESS)
    tc.create()
    tc.attach(dp.obj.program(UPLINK).fd, handle=TC_HANDLE, priority=TC_PRIORITY)
    capture = Capture("vm1p")
    try:
        assert libbpf.XdpHook(up1).attach(
            dp.obj.program("lh_uplink_mpls").fd, flags=libbpf.XDP_FLAGS_SKB_MODE
        )
        before = dp.counter_values()
        for frame in frags:
            send("up1p", labelled(frame, (A60, B60)))
            capture.expect(bytes(ttl(frame, 60)), timeout=5.0)
    finally:
        capture.close()
        libbpf.XdpHook(up1).detach("lh_uplink_mpls")
        tc.detach(handle=TC_HANDLE, priority=TC_PRIORITY)
    after = dp.counter_values()
    moved = {c: after[(n, c)] - before[(n, c)] for (n, c) in after if n == "up1"}
    assert {c: v for c, v in moved.items() if v} == {
        C.MPLS_POPPED: len(frags),
        C.REFRESHED: 1,
        C.SVC_PINNED: 1,
        C.FRAGMENT_FOLLOWED: len(frags) - 1,
    }


def send(ifname: str, frame: Packet) -> None:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((ifname, 0))
        s.send(bytes(frame))


SLOT_VXLAN = 6  # vx1's counter slot
ENDPOINT, HOST_ENDPOINT = "10.255.0.1", "10.255.0.100"  # fw B's tunnel endpoint, the host's


@dataclass(frozen=True)
class Vxlan:
    index: int  # vx1: an external VXLAN device, lh_uplink on its ingress
    underlay_mac: str  # ulh's: the host's underlay leg (ulhp: where the test sends from)


@pytest.fixture
def vxlan(dp: Datapath, test_netns) -> Iterator[Vxlan]:  # type: ignore[no-untyped-def]
    """vx1 (external, collect-metadata: every packet it decapsulates carries
    its tunnel key) over the underlay leg ulh (HOST_ENDPOINT), in the test
    namespace; removed afterwards, with its filter."""
    test_netns.add_veths([("ulh", "02:00:00:00:05:01")])
    cfg_key = b""
    try:
        subprocess.run(["ip", "addr", "add", f"{HOST_ENDPOINT}/24", "dev", "ulh"], check=True)
        subprocess.run(["ip", "link", "add", "vx1", "type", "vxlan", "external", "dstport",
                        "4789"], check=True)  # fmt: skip
        subprocess.run(["ip", "link", "set", "vx1", "up"], check=True)
        index = socket.if_nametoindex("vx1")
        cfg_key = index.to_bytes(4, "little")
        cfg = abi.IfaceCfg(role=int(abi.Role.UPLINK), slot=SLOT_VXLAN, link_kind=int(K.VXLAN))
        dp.iface_map.update(cfg_key, bytes(cfg))
        hook = TcHook(index, INGRESS)
        hook.create()
        hook.attach(dp.obj.program(UPLINK).fd, handle=TC_HANDLE, priority=TC_PRIORITY)
        yield Vxlan(index, "02:00:00:00:05:01")
    finally:
        test_netns.del_links(["vx1", "ulh"])
        if cfg_key:
            dp.iface_map.update(cfg_key, bytes(abi.IfaceCfg()))


def encapsulated(inner: Packet, underlay_mac: str) -> Packet:
    """*inner* as fw B's VXLAN device sends it to the host (VNI 100)."""
    from scapy.layers.vxlan import VXLAN

    return (
        Ether(src="02:00:00:00:05:0b", dst=underlay_mac)
        / IP(src=ENDPOINT, dst=HOST_ENDPOINT, ttl=64)
        / UDP(sport=49152, dport=4789, chksum=0)
        / VXLAN(flags="Instance", NextProtocol=0, vni=100)  # scapy's default is VXLAN-GPE
        / Ether(bytes(inner))
    )


def tunnel_hop(dp: Datapath, descs: HopSlots) -> int:
    """fw B's hop as encap_learn stores it ({ENDPOINT, VNI 100}); its id."""
    hop = desc4(endpoint=0x0AFF0001, vni=100)
    hop_id = hop_desc_hash(hop)
    descs.update(hop_id.to_bytes(4, "little"), bytes(hop))
    return hop_id


@pytest.mark.parametrize("family", [4, 6])
def test_every_request_fragment_out_of_the_tunnel_reaches_the_services_vm(
    dp: Datapath, descs: HopSlots, vxlan: Vxlan, family: int
) -> None:
    """Each fragment arrives in a VXLAN packet of its own (with the tunnel
    key, which only the first needs): the first one's endpoint and VNI are the
    entry's hop, so it goes to the service's VM, and the later ones follow."""
    frags = request_fragments(family)
    dp.configure("vm1", vm_mac=MAC_VM_1)
    pin_to_vm1(dp, frags[0], vxlan.index, flags=HOP | EXT, hop_id=tunnel_hop(dp, descs))
    capture = Capture("vm1p")
    try:
        before = slot_counts(dp, SLOT_VXLAN)
        for frame in frags:
            send("ulhp", encapsulated(frame, vxlan.underlay_mac))
            capture.expect(bytes(frame), timeout=5.0)
    finally:
        capture.close()
    assert moved_by(before, slot_counts(dp, SLOT_VXLAN)) == {
        C.REFRESHED: 1,
        C.SVC_PINNED: 1,
        C.FRAGMENT_FOLLOWED: len(frags) - 1,
    }


@pytest.mark.parametrize(
    ("error", "request_"),
    [(frag_needed(tcp4_reply(), MAC_VM_1), REQ4), (too_big(tcp6_reply(), MAC_VM_1), REQ6)],
    ids=["v4 fragmentation needed", "v6 packet too big"],
)
def test_an_error_out_of_the_tunnel_reaches_the_services_vm(
    dp: Datapath, descs: HopSlots, vxlan: Vxlan, error: Packet, request_: Packet
) -> None:
    """A real VXLAN packet carrying a router's error about a service's reply:
    decapsulated, it reaches vm1 as the bridge would give it."""
    dp.configure("vm1", vm_mac=MAC_VM_1)
    pin_to_vm1(dp, request_, vxlan.index, flags=HOP | EXT, hop_id=tunnel_hop(dp, descs))
    capture = Capture("vm1p")
    try:
        before = slot_counts(dp, SLOT_VXLAN)
        send("ulhp", encapsulated(error, vxlan.underlay_mac))
        capture.expect(bytes(to_vm(error)), timeout=5.0)
    finally:
        capture.close()
    assert moved_by(before, slot_counts(dp, SLOT_VXLAN)) == {C.ICMP_ERROR_REDIRECTED: 1}
