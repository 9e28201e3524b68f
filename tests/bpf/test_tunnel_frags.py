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
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6, IPv6ExtHdrFragment
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from lasthop import abi, libbpf
from packets import (
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
    TC_ACT_OK,
    TC_ACT_REDIRECT,
    UPLINK,
    VMPORT,
    Case,
    Datapath,
    Entry,
    Key,
    bridged,
    check,
    routed,
)
from .test_encap import desc4
from .test_frag import run_later
from .test_mpls import desc, meta, run_xdp, ttl
from .test_uplink_icmp import frag_needed, held, to_vm, too_big

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.netns]

C = abi.Counter
ST = abi.State
K = abi.LinkKind
HOP = abi.F_ENTRY_HOP_KNOWN
EXT = abi.F_ENTRY_HOP_EXT
HOP_ID = 0x00050006  # any id: a reply reads the one its entry names
A60, B60 = lse(MPLS_LABEL_A), lse(MPLS_LABEL_B)


@pytest.fixture
def descs(dp: Datapath) -> Iterator[libbpf.Map]:
    """lh_hop_descs, emptied before and after (Datapath.reset leaves it)."""
    m = dp.obj.map("lh_hop_descs")
    for key in list(m.keys()):
        m.delete(key)
    yield m
    for key in list(m.keys()):
        m.delete(key)


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
            dp.obj.map("lh_hop_descs").update(HOP_ID.to_bytes(4, "little"), bytes(hop))
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
]  # fmt: skip


@pytest.mark.parametrize("row", ERROR_ROWS, ids=str)
def test_an_error_from_beyond_a_tunnel_reaches_the_vm(dp: Datapath, descs: libbpf.Map,
                                                      row: ErrorRow) -> None:  # fmt: skip
    """The error is keyed by its quote (VM 1's reply as it left, before any
    encapsulation): it goes to the VM port that holds the connection, as the
    bridge would give it (the guest's MAC, untagged, unlabelled), and changes
    no entry; the tunnel's inner frame needs no tunnel key for that."""
    check(dp, row.case, hop_setup(row.kind, row.hop, row.case.setup))


@pytest.mark.parametrize(
    ("error", "entry"),
    [(frag_needed(tcp4_reply(), MAC_UPLINK_1), SERVICE4),
     (too_big(tcp6_reply(), MAC_UPLINK_1), SERVICE6)],
    ids=["v4 fragmentation needed", "v6 packet too big"],
)  # fmt: skip
def test_an_error_under_labels_is_popped_then_reaches_the_vm(
    dp: Datapath, descs: libbpf.Map, error: Packet, entry: Entry
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
    dp: Datapath, descs: libbpf.Map, hop: Hop, family: int
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
    dp: Datapath, descs: libbpf.Map
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
        bytes(Ether(src=MAC_VM_1, dst=MAC_FW_A) / IPv6(src="2001:db8:2::11", dst="2001:db8:100::20",
                                                       nh=44, plen=4)
              / Raw(bytes(IPv6ExtHdrFragment(offset=10, m=1))[:4])))),
]  # fmt: skip


@pytest.mark.parametrize("frame", [m[1] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_a_malformed_later_fragment_of_a_tunnelled_reply_passes_counted(
    dp: Datapath, descs: libbpf.Map, frame: Packet
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
    dp: Datapath, descs: libbpf.Map
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
    frags = (udp4_fragments if family == 4 else udp6_fragments)(
        src=IP_CLIENT_B if family == 4 else "2001:db8:100::20",
        dst=IP_VM_1 if family == 4 else "2001:db8:2::11",
        sport=PORT_CLIENT, dport=PORT_DNS, src_mac=MAC_FW_B, dst_mac=MAC_VM_1,
    )  # fmt: skip
    for frame in frags:
        before = dp.counter_values()
        run = run_xdp(dp, bytes(labelled(frame, (A60, B60))))
        assert run.data.hex() == (meta(A60, B60) + bytes(ttl(frame, 60))).hex()
        after = dp.counter_values()
        assert {k: after[k] - before[k] for k in after if after[k] != before[k]} == {
            ("up1", C.MPLS_POPPED): 1
        }
