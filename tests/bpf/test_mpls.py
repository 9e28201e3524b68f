"""mpls.h: MPLS on an Ethernet uplink, through BPF_PROG_TEST_RUN and a veth.

    firewall ── up1p ══ up1: XDP lh_uplink_mpls ──▶ tc lh_uplink ──▶ entry {mac, hop id}
                         labels off, into the         learns the stack    └▶ lh_hop_descs[id]
                         frame's metadata             from the metadata       {MPLS, labels}
    vm1 ── lh_vmport ── reply: dst MAC := hop MAC, labels pushed (TTL := IP TTL) ──▶ up1

What XDP does to a frame is a table of rows run with test run (exact bytes
out: the metadata, then the frame). Test run gives a tc program no metadata,
so the learning is tested on a veth (native and generic XDP), and the reply
as rows through lh_vmport with a descriptor put in place.
"""

from __future__ import annotations

import contextlib
import ctypes
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from scapy.contrib.mpls import MPLS
from scapy.layers.inet import IP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet

from lasthop import abi
from lasthop.datapath import hop_desc_hash, libbpf
from packets import (
    MAC_FW_B,
    MAC_VM_1,
    MAC_VMPORT_1,
    MPLS_LABEL_A,
    MPLS_LABEL_B,
    MPLS_LABEL_C,
    VLAN_C,
    VLAN_S,
    Lse,
    dot1ad,
    dot1q,
    labelled,
    lse,
    tci,
    tcp4_reply,
    tcp4_request,
    tcp6_reply,
    tcp6_request,
    udp4_request,
)

from .harness import (
    PENDING,
    TC_ACT_OK,
    TC_ACT_REDIRECT,
    UPLINK,
    VMPORT,
    Datapath,
    Entry,
    HopSlots,
    Key,
    bridged,
    inner_tag,
    routed,
)

C = abi.Counter
XDP = "lh_uplink_mpls"
XDP_PASS = 2
HOP_ID = 0x00030004  # any id: the reply reads the one its entry names
_XDP_MD = struct.Struct(
    "<6I"
)  # struct xdp_md: data, data_end, data_meta, ingress, rx queue, egress


def meta(*entries: Lse) -> bytes:
    """The metadata lh_uplink_mpls leaves: struct mpls_meta of the stack as received."""
    m = abi.MplsMeta(magic=abi.MPLS_META_MAGIC, count=len(entries))
    for i, (label, tc, ttl) in enumerate(entries):
        m.lse[i] = label << 12 | tc << 9 | int(i == len(entries) - 1) << 8 | ttl
    return bytes(m)


def ttl(frame: Packet, value: int) -> Packet:
    """The frame with its IP TTL (hop limit) := value, the IPv4 checksum as scapy computes it."""
    out = Ether(bytes(frame))
    if IP in out:
        out[IP].ttl = value
        del out[IP].chksum
    else:
        out[IPv6].hlim = value
    return Ether(bytes(out))


def run_xdp(dp: Datapath, frame: bytes, iface: str = "up1") -> libbpf.TestRun:
    ctx = _XDP_MD.pack(0, len(frame), 0, dp.ifaces[iface].ifindex, 0, 0)
    return dp.obj.program(XDP).test_run(frame, ctx=ctx)


def set_link_kind(dp: Datapath, iface: str, kind: abi.LinkKind) -> None:
    key = dp.ifaces[iface].ifindex.to_bytes(4, "little")
    cfg = abi.IfaceCfg.from_buffer_copy(dp.iface_map.lookup(key))
    cfg.link_kind = int(kind)
    dp.iface_map.update(key, bytes(cfg))


def moved(dp: Datapath, before: dict[tuple[str, abi.Counter], int], iface: str) -> dict:  # type: ignore[type-arg]
    after = dp.counter_values()
    return {
        c: after[(n, c)] - before[(n, c)]
        for (n, c) in after
        if n == iface and after[(n, c)] != before[(n, c)]
    }


# ---------------------------------------------------------------- XDP: the labels off


A60, B60, C60 = lse(MPLS_LABEL_A), lse(MPLS_LABEL_B), lse(MPLS_LABEL_C)


@dataclass(frozen=True)
class PopRow:
    description: str
    frame: bytes
    output: bytes  # the metadata, then the frame
    counters: dict[abi.Counter, int] = field(default_factory=dict)


POP_ROWS = [
    PopRow(
        "one label over IPv4 goes into the metadata; the IP TTL drops to the label's (uniform)",
        bytes(labelled(tcp4_request(), (A60,))),
        meta(A60) + bytes(ttl(tcp4_request(), 60)),
        {C.MPLS_POPPED: 1},
    ),
    PopRow(
        "three labels over IPv6; a top label TTL above the hop limit leaves it (pipe-model peer)",
        bytes(labelled(tcp6_request(), (lse(MPLS_LABEL_A, 255), B60, C60))),
        meta(lse(MPLS_LABEL_A, 255), B60, C60) + bytes(tcp6_request()),
        {C.MPLS_POPPED: 1},
    ),
    PopRow(
        "two labels under an 802.1Q tag: the tag stays, the labels go",
        bytes(labelled(tcp4_request(vlans=(dot1q(),)), (A60, B60))),
        meta(A60, B60) + bytes(ttl(tcp4_request(vlans=(dot1q(),)), 60)),
        {C.MPLS_POPPED: 1},
    ),
    PopRow(
        "one label over UDP, its TTL the IP TTL: the IP header unchanged",
        bytes(labelled(udp4_request(), (lse(MPLS_LABEL_A, 64),))),
        meta(lse(MPLS_LABEL_A, 64)) + bytes(udp4_request()),
        {C.MPLS_POPPED: 1},
    ),
    PopRow(
        "a QinQ-tagged stack: the Ethernet header and both tags move up",
        bytes(labelled(tcp6_request(vlans=(dot1ad(), dot1q())), (A60,))),
        meta(A60) + bytes(ttl(tcp6_request(vlans=(dot1ad(), dot1q())), 60)),
        {C.MPLS_POPPED: 1},
    ),
    PopRow(
        "four labels: deeper than kept, passes unchanged, counted",
        bytes(labelled(tcp4_request(), (A60, B60, C60, A60))),
        bytes(labelled(tcp4_request(), (A60, B60, C60, A60))),
        {C.ENCAP_UNSUPPORTED: 1},
    ),
    PopRow(
        "three labels, no bottom of stack, then the frame ends: malformed, unchanged",
        bytes(labelled(tcp4_request(), (A60, B60, C60), bottom=False))[: 14 + 12],
        bytes(labelled(tcp4_request(), (A60, B60, C60), bottom=False))[: 14 + 12],
        {C.MPLS_MALFORMED: 1},
    ),
    PopRow(
        "a label cut short: malformed, unchanged",
        bytes(labelled(tcp4_request(), (A60,)))[: 14 + 2],
        bytes(labelled(tcp4_request(), (A60,)))[: 14 + 2],
        {C.MPLS_MALFORMED: 1},
    ),
    PopRow(
        "an IPv4 header cut short under the label: malformed, unchanged",
        bytes(labelled(tcp4_request(), (A60,)))[: 14 + 4 + 10],
        bytes(labelled(tcp4_request(), (A60,)))[: 14 + 4 + 10],
        {C.MPLS_MALFORMED: 1},
    ),
    PopRow(
        "a pseudowire (an Ethernet frame under the label): neither IP version, unchanged",
        bytes(
            Ether(src=MAC_FW_B, dst=MAC_VM_1)
            / MPLS(label=MPLS_LABEL_A, s=1, ttl=60)
            / bytes(tcp4_request())
        ),
        bytes(
            Ether(src=MAC_FW_B, dst=MAC_VM_1)
            / MPLS(label=MPLS_LABEL_A, s=1, ttl=60)
            / bytes(tcp4_request())
        ),
        {C.ENCAP_UNSUPPORTED: 1},
    ),
    PopRow(
        "a frame without labels is not touched nor counted (lh_uplink counts it)",
        bytes(tcp4_request()),
        bytes(tcp4_request()),
    ),
    PopRow(
        "MPLS multicast (0x8848) is not touched nor counted",
        bytes(
            Ether(src=MAC_FW_B, dst=MAC_VM_1, type=0x8848)
            / MPLS(label=MPLS_LABEL_A, s=1, ttl=60)
            / IP()
        ),
        bytes(
            Ether(src=MAC_FW_B, dst=MAC_VM_1, type=0x8848)
            / MPLS(label=MPLS_LABEL_A, s=1, ttl=60)
            / IP()
        ),
    ),
]


@pytest.mark.parametrize("row", POP_ROWS, ids=[r.description for r in POP_ROWS])
def test_xdp_takes_the_label_stack_off(dp: Datapath, row: PopRow) -> None:
    set_link_kind(dp, "up1", abi.LinkKind.MPLS)
    before = dp.counter_values()
    run = run_xdp(dp, row.frame)
    assert run.retval == XDP_PASS
    assert run.data.hex() == row.output.hex()
    assert moved(dp, before, "up1") == row.counters


# ---------------------------------------------------------------- tc: the labels back on


def desc(*entries: Lse, tags: tuple[int, ...] = ()) -> abi.HopDesc:
    """An MPLS hop as mpls_learn stores it: label and TC of each entry, S and TTL 0."""
    d = abi.HopDesc(kind=int(abi.HopKind.MPLS), mpls_count=len(entries))
    for i, (label, tc, _ttl) in enumerate(entries):
        d.mpls[i] = label << 12 | tc << 9
    for i, t in enumerate(tags):
        d.vlan_tci[i] = t
    return d


def put_mpls_entry(
    dp: Datapath, request: Packet, tags: int = 0, ad: bool = False, iface: str = "up1"
) -> None:
    """The entry a labelled request leaves: firewall B's MAC on *iface*, the hop's id."""
    entry = Entry(Key(request), mac=MAC_FW_B, iface=iface, packets=3)
    e = dp.pack_entry(entry)
    e.flags |= abi.F_ENTRY_HOP_EXT | (abi.F_ENTRY_OUTER_8021AD if ad else 0)
    e.vlan_count = tags
    e.vlan_tci[0], e.vlan_tci[1] = HOP_ID & 0xFFFF, HOP_ID >> 16
    dp.tables["confirmed"].update(entry.key.pack(), bytes(e))


@dataclass(frozen=True)
class PushRow:
    description: str
    request: Packet
    reply: Packet
    hop: abi.HopDesc
    output: Packet | None  # None: unchanged
    counters: dict[abi.Counter, int]
    routed: bool = False
    tags: int = 0
    gso_size: int = 0


PUSH_ROWS = [
    PushRow(
        "one label: pushed under the Ethernet header, its TTL the IP TTL, bottom of stack",
        tcp4_request(),
        tcp4_reply(),
        desc(A60),
        labelled(bridged(tcp4_reply()), (lse(MPLS_LABEL_A, 64),)),
        {C.REDIRECTED: 1, C.ENCAP_REDIRECTED: 1},
    ),
    PushRow(
        "three labels over IPv6: the bottom-of-stack bit on the last only, the TC kept",
        tcp6_request(),
        tcp6_reply(hlim=33),
        desc(A60, B60, lse(MPLS_LABEL_C, 60, 0)),
        labelled(
            bridged(tcp6_reply(hlim=33)),
            (lse(MPLS_LABEL_A, 33), lse(MPLS_LABEL_B, 33), lse(MPLS_LABEL_C, 33, 0)),
        ),
        {C.REDIRECTED: 1, C.ENCAP_REDIRECTED: 1},
    ),
    PushRow(
        "a routed host: TTL - 1 first, the labels carry the new TTL",
        tcp4_request(),
        tcp4_reply(dst_mac=MAC_VMPORT_1),
        desc(A60, B60),
        labelled(
            routed(tcp4_reply(dst_mac=MAC_VMPORT_1)), (lse(MPLS_LABEL_A, 63), lse(MPLS_LABEL_B, 63))
        ),
        {C.REDIRECTED: 1, C.ENCAP_REDIRECTED: 1},
        routed=True,
    ),
    PushRow(
        "QinQ tags and a label: labels inside the tags (test run shows the inner tag in the data)",
        tcp4_request(),
        tcp4_reply(),
        desc(A60, tags=(tci(VLAN_S), tci(VLAN_C))),
        inner_tag(labelled(bridged(tcp4_reply()), (lse(MPLS_LABEL_A, 64),)), tci(VLAN_C)),
        {C.REDIRECTED: 1, C.ENCAP_REDIRECTED: 1},
        tags=2,
    ),
    PushRow(
        "a GSO reply (larger than a frame): this kernel cannot segment MPLS, passes unchanged",
        tcp4_request(),
        tcp4_reply(),
        desc(A60),
        None,
        {C.MPLS_GSO: 1},
        gso_size=1400,
    ),
]


@pytest.mark.parametrize("row", PUSH_ROWS, ids=[r.description for r in PUSH_ROWS])
def test_reply_gets_the_label_stack_back(dp: Datapath, descs: HopSlots, row: PushRow) -> None:
    if row.routed:
        dp.configure("vm1", flags=abi.F_IFACE_ROUTED)
    put_mpls_entry(dp, row.request, tags=row.tags, ad=row.tags == 2)
    descs.update(HOP_ID.to_bytes(4, "little"), bytes(row.hop))
    before = dp.counter_values()
    run = dp.run(VMPORT, bytes(row.reply), "vm1", gso_size=row.gso_size)
    out = bytes(row.reply) if row.output is None else bytes(row.output)
    assert run.retval == (TC_ACT_OK if row.output is None else TC_ACT_REDIRECT)
    assert dp.redirected_to() == (None if row.output is None else "up1")
    assert run.data.hex() == out.hex()
    assert moved(dp, before, "vm1") == row.counters


# ---------------------------------------------------------------- a veth: XDP then tc


XDP_FLAGS_SKB_MODE = libbpf.XDP_FLAGS_SKB_MODE
XDP_FLAGS_DRV_MODE = libbpf.XDP_FLAGS_DRV_MODE


def _send(ifname: str, frame: bytes) -> None:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((ifname, 0))
        s.send(frame)


def _wait_for(pred, what: str, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.contextmanager
def _mpls_uplink(dp: Datapath, mode: int) -> Iterator[None]:
    """up1 an MPLS uplink: lh_uplink on its tc ingress, lh_uplink_mpls as XDP
    in *mode*; both taken off after."""
    set_link_kind(dp, "up1", abi.LinkKind.MPLS)
    up1 = dp.ifaces["up1"].ifindex
    tc = libbpf.TcHook(up1, libbpf.INGRESS)
    tc.create()
    tc.attach(dp.obj.program(UPLINK).fd, handle=1, priority=1)
    try:
        assert libbpf.XdpHook(up1).attach(dp.obj.program(XDP).fd, flags=mode)
        yield
    finally:
        libbpf.XdpHook(up1).detach(XDP)
        tc.detach(handle=1, priority=1)
    assert libbpf.XdpHook(up1).query() is None


@pytest.mark.parametrize(
    "mode", [XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE], ids=["native", "generic"]
)
@pytest.mark.parametrize(
    "request_frame, tags",
    [(tcp4_request(), ()), (tcp6_request(vlans=(dot1q(),)), (tci(VLAN_C),))],
    ids=["ipv4", "ipv6-tagged"],
)
def test_a_labelled_request_is_learned_with_its_stack(  # type: ignore[no-untyped-def]
    dp: Datapath, descs: HopSlots, mode: int, request_frame: Packet, tags: tuple[int, ...]
) -> None:
    """Through a veth: XDP takes two labels off, tc learns the connection with
    a descriptor of the stack (labels and TC, no TTL or S bit) and the tags."""
    with _mpls_uplink(dp, mode):
        before = dp.counter_values()
        _send("up1p", bytes(labelled(request_frame, (A60, lse(MPLS_LABEL_B, 61, 2)))))
        key = Key(request_frame).pack()
        raw = _wait_for(lambda: dp.tables[PENDING].lookup(key), "the connection's entry")
        e = abi.ConnEntry.from_buffer_copy(raw[: ctypes.sizeof(abi.ConnEntry)])
        assert e.flags & abi.F_ENTRY_HOP_EXT and e.vlan_count == len(tags)
        hop_id = abi.hop_desc_id(e)
        got = abi.HopDesc.from_buffer_copy(descs.lookup(hop_id.to_bytes(4, "little")))
        want = desc(A60, lse(MPLS_LABEL_B, 61, 2), tags=tags)
        assert got.gen & 1 == 0 and abi.hop_id_of(abi.hop_id_slot(hop_id)[0], got.gen) == hop_id
        got.mark, got.gen = 0, 0
        assert bytes(got) == bytes(want)
        assert moved(dp, before, "up1") == {C.MPLS_POPPED: 1, C.LEARNED: 1}


def test_a_labelled_request_whose_slots_are_all_taken_is_not_learned(
    dp: Datapath, descs: HopSlots
) -> None:
    """Slot exhaustion on the data path: the HOP_DESC_PROBES slots of the
    stack's descriptor hold other hops, so tc refuses the new hop
    (hop_desc_full), learns no connection and passes the frame; the slots
    are untouched."""
    want = desc(A60, lse(MPLS_LABEL_B, 61, 2))
    base = hop_desc_hash(want) & abi.HOP_SLOT_MASK
    window = [(base + i) & abi.HOP_SLOT_MASK for i in range(abi.HOP_DESC_PROBES)]
    for i, slot in enumerate(window):
        descs.update(slot.to_bytes(4, "little"), bytes(desc(lse(100 + i, 60))))
    taken = {slot: bytes(descs.slot(slot)) for slot in window}
    with _mpls_uplink(dp, XDP_FLAGS_SKB_MODE):
        before = dp.counter_values()
        _send("up1p", bytes(labelled(tcp4_request(), (A60, lse(MPLS_LABEL_B, 61, 2)))))
        _wait_for(lambda: moved(dp, before, "up1").get(C.HOP_DESC_FULL), "hop_desc_full")
        assert moved(dp, before, "up1") == {C.MPLS_POPPED: 1, C.HOP_DESC_FULL: 1}
        assert dp.tables[PENDING].lookup(Key(tcp4_request()).pack()) is None
        assert {slot: bytes(descs.slot(slot)) for slot in window} == taken
