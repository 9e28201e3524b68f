"""The fast paths (bpf/fastpath.h): lh_vmport's reply and lh_uplink's refresh
of an established connection take a short way first, and do exactly what the
general path does with the same packet.

    uplink (lh_uplink)                          VM port (lh_vmport)
    ACK of an established connection            reply of an established connection
      -> fast_refresh: last_seen, packets         -> fast_reply: MAC := last hop's, tags,
         (anything else: the general path)           redirect (anything else: general)

Two kinds of check: rows with exact expectations (the fast path taken, or
left to the general path, as the row says: lh_trace_fast counts the packets
it took), and every row of the other packet tables run twice from the same
set-up -- through lh_uplink / lh_vmport, and through lh_uplink_general /
lh_vmport_general (the general path alone, test builds only) -- with
everything compared: verdict, redirect, output bytes, counters, tables.
"""

from __future__ import annotations

import ctypes
import ipaddress
import struct
from collections.abc import Iterator
from dataclasses import dataclass, replace

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt
from scapy.packet import Packet

from lasthop import abi
from lasthop.libbpf import Map
from packets import (
    IP6_CLIENT_B,
    IP6_VM_1,
    IP_CLIENT_B,
    IP_VM_1,
    MAC_BROADCAST,
    MAC_FW_A,
    MAC_FW_B,
    MAC_FW_C,
    MAC_VM_1,
    MAC_VM_2,
    MAC_VMPORT_1,
    MPLS_LABEL_A,
    MPLS_LABEL_B,
    MPLS_LABEL_C,
    PORT_CLIENT,
    PORT_HTTP,
    VLAN_C,
    VLAN_S,
    dot1q,
    eth,
    labelled,
    lse,
    tci,
    tcp4_reply,
    tcp4_request,
    tcp6_reply,
    tcp6_request,
)

from . import (
    test_conntrack,
    test_encap,
    test_failover,
    test_malformed,
    test_mpls,
    test_scope,
    test_uplink,
    test_vm_untagged,
    test_vmport,
)
from .harness import (
    CONFIRMED,
    MARKS,
    PENDING,
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
    ids,
    inner_tag,
    prepare,
    routed,
)

EST = abi.State.TCP_ESTABLISHED
pytestmark = MARKS
GENERAL = {UPLINK: "lh_uplink_general", VMPORT: "lh_vmport_general"}
VM_MACS = (("vm1", MAC_VM_1), ("vm2", MAC_VM_2))


def request4(flags: str = "A") -> Packet:
    return (
        eth(MAC_FW_B, MAC_VM_1)
        / IP(src=IP_CLIENT_B, dst=IP_VM_1)
        / TCP(sport=PORT_CLIENT, dport=PORT_HTTP, flags=flags)
    )


def reply4(flags: str = "A", **ip: object) -> Packet:
    return (
        eth(MAC_VM_1, MAC_FW_A)
        / IP(src=IP_VM_1, dst=IP_CLIENT_B, **ip)
        / TCP(sport=PORT_HTTP, dport=PORT_CLIENT, flags=flags)
    )


def _udp_ends(family: int) -> tuple[type[Packet], str, str]:
    """The IP layer, the client's and the VM's address of a UDP row."""
    if family == 6:
        return IPv6, IP6_CLIENT_B, IP6_VM_1
    return IP, IP_CLIENT_B, IP_VM_1


def udp_request(family: int) -> Packet:
    layer, client, vm = _udp_ends(family)
    return (
        eth(MAC_FW_B, MAC_VM_1)
        / layer(src=client, dst=vm)
        / UDP(sport=PORT_CLIENT, dport=PORT_HTTP)
        / b"query"
    )


def udp_reply(family: int) -> Packet:
    layer, client, vm = _udp_ends(family)
    return (
        eth(MAC_VM_1, MAC_FW_A)
        / layer(src=vm, dst=client)
        / UDP(sport=PORT_HTTP, dport=PORT_CLIENT)
        / b"answer"
    )


def request6(flags: str = "A") -> Packet:
    return (
        eth(MAC_FW_B, MAC_VM_1)
        / IPv6(src=IP6_CLIENT_B, dst=IP6_VM_1)
        / TCP(sport=PORT_CLIENT, dport=PORT_HTTP, flags=flags)
    )


def reply6(flags: str = "A") -> Packet:
    return (
        eth(MAC_VM_1, MAC_FW_A)
        / IPv6(src=IP6_VM_1, dst=IP6_CLIENT_B)
        / TCP(sport=PORT_HTTP, dport=PORT_CLIENT, flags=flags)
    )


def est(request: Packet, **kw: object) -> Entry:
    """An established, confirmed connection from firewall B on up1."""
    fields: dict[str, object] = {"mac": MAC_FW_B, "iface": "up1", "packets": 3, "state": EST}
    fields.update(kw)
    return Entry(Key(request), **fields)  # type: ignore[arg-type]


def fast_taken(dp: Datapath) -> int:
    raw = dp.obj.map("lh_trace_fast").lookup(struct.pack("<I", 0))
    return struct.unpack("<Q", raw[:8])[0] if raw else 0


def reply_row(desc: str, reply: Packet, entry: Entry, **kw: object) -> Case:
    """A reply the fast path takes: to firewall B on up1, bridged."""
    fields: dict[str, object] = {
        "vm_macs": VM_MACS,
        "setup": (entry,),
        "verdict": TC_ACT_REDIRECT,
        "redirect": "up1",
        "output": bridged(reply),
        "after": (entry.but(replies=1, seen="now"),),
        "counters": {("vm1", C.REDIRECTED): 1},
    }
    fields.update(kw)
    return Case(desc, VMPORT, "vm1", reply, **fields)  # type: ignore[arg-type]


def refresh_row(desc: str, request: Packet, entry: Entry, **kw: object) -> Case:
    """A request the fast path refreshes: it goes on unchanged."""
    fields: dict[str, object] = {
        "setup": (entry,),
        "after": (entry.but(packets=entry.packets + 1, seen="now"),),
        "counters": {("up1", C.REFRESHED): 1},
    }
    fields.update(kw)
    return Case(desc, UPLINK, "up1", request, **fields)  # type: ignore[arg-type]


VM_FAST_HOP = abi.F_ENTRY_HOP_KNOWN | abi.F_ENTRY_VM_FAST  # the VM answered: its shortcut


def to_vm_row(desc: str, request: Packet, entry: Entry) -> Case:
    """A request of a connection whose VM answered (entry: vm1, VM_FAST),
    fast path on: refreshed and sent to vm1 as it came."""
    return refresh_row(
        desc,
        request,
        entry,
        settings=abi.F_SET_FAST_PATH,
        vm_macs=VM_MACS,
        verdict=TC_ACT_REDIRECT,
        redirect="vm1",
        output=request,
        counters={("up1", C.REFRESHED): 1, ("up1", C.FAST_TO_VM): 1},
    )


# (case, whether the fast path takes it)
ROWS: list[tuple[Case, bool]] = [
    (reply_row("v4 reply of an established connection", reply4(), est(request4())), True),
    (reply_row("v6 reply of an established connection", reply6(), est(request6())), True),
    (
        reply_row("v4 reply with PSH and data", reply4("PA") / b"data", est(request4())),
        True,
    ),
    (
        reply_row(
            "a tagged last hop: its tag pushed back (into the skb's metadata)",
            reply4(),
            est(request4(), vlans=(tci(VLAN_C),)),
        ),
        True,
    ),
    (
        reply_row(
            "fast path on: the guest's answer makes vm1 the connection's shortcut",
            reply4(),
            est(request4()),
            settings=abi.F_SET_FAST_PATH,
            after=(
                est(
                    request4(),
                    replies=1,
                    seen="now",
                    vm="vm1",
                    flags=abi.F_ENTRY_HOP_KNOWN | abi.F_ENTRY_VM_FAST,
                ),
            ),
        ),
        True,
    ),
    (
        reply_row(
            "v4 UDP reply of a confirmed stream",
            udp_reply(4),
            est(udp_request(4), state=abi.State.UDP_STREAM),
        ),
        True,
    ),
    (
        reply_row(
            "v6 UDP reply of a confirmed stream",
            udp_reply(6),
            est(udp_request(6), state=abi.State.UDP_STREAM),
        ),
        True,
    ),
    (
        reply_row(
            "a UDP answer of a stream not yet confirmed: the general path's second lookup",
            udp_reply(4),
            est(udp_request(4), state=abi.State.UDP_ANSWERED, table=PENDING),
        ),
        False,
    ),
    (
        reply_row(
            "v6: a UDP answer of a stream not yet confirmed: the pending table holds it",
            udp_reply(6),
            est(udp_request(6), state=abi.State.UDP_ANSWERED, table=PENDING),
        ),
        False,
    ),
    (
        refresh_row(
            "v4 UDP request sent again, unanswered: the fast path's pending lookup finds it,"
            " refreshed (not learned again)",
            udp_request(4),
            est(udp_request(4), state=abi.State.UDP_NEW, table=PENDING),
        ),
        False,
    ),
    (
        refresh_row(
            "v6 UDP request sent again, unanswered: the fast path's pending lookup finds it,"
            " refreshed (not learned again)",
            udp_request(6),
            est(udp_request(6), state=abi.State.UDP_NEW, table=PENDING),
        ),
        False,
    ),
    (
        reply_row(
            "a FIN: its state moves",
            reply4("FA"),
            est(request4()),
            after=(
                est(
                    request4(),
                    replies=1,
                    seen="now",
                    state=abi.State.TCP_CLOSING,
                    flags=abi.F_ENTRY_HOP_KNOWN | abi.F_ENTRY_FIN_ANSWERER,
                ),
            ),
            table_counters={abi.TableCounter.STATE_CHANGES: 1},
        ),
        False,
    ),
    (
        reply_row(
            "a RST: its state moves",
            reply4("R"),
            est(request4()),
            after=(est(request4(), replies=1, seen="now", state=abi.State.TCP_CLOSED),),
            table_counters={abi.TableCounter.STATE_CHANGES: 1},
        ),
        False,
    ),
    (
        reply_row(
            "IP options: counted by the general path",
            reply4(options=b"\x94\x04\x00\x00"),
            est(request4()),
            counters={("vm1", C.REDIRECTED): 1, ("vm1", C.IP_OPTIONS): 1},
        ),
        False,
    ),
    (
        reply_row(
            "an IPv6 extension header: counted by the general path",
            eth(MAC_VM_1, MAC_FW_A)
            / IPv6(src=IP6_VM_1, dst=IP6_CLIENT_B)
            / IPv6ExtHdrDestOpt()
            / TCP(sport=PORT_HTTP, dport=PORT_CLIENT, flags="A"),
            est(request6()),
            counters={("vm1", C.REDIRECTED): 1, ("vm1", C.IPV6_EXT): 1},
        ),
        False,
    ),
    (
        reply_row(
            "a pending entry (answered SYN): the general path's second lookup",
            reply4(),
            est(request4(), state=abi.State.TCP_SYN_RECV, table=PENDING),
        ),
        False,
    ),
    (
        reply_row(
            "the guest's MAC not yet known: the general path learns it",
            reply4(),
            est(request4()),
            vm_macs=(("vm2", MAC_VM_2),),
        ),
        False,
    ),
    (
        reply_row(
            "a routed VM port: TTL and the uplink's MAC, by the general path",
            reply4(),
            est(request4()),
            routed=True,
            output=routed(reply4()),
        ),
        False,
    ),
    (
        reply_row(
            "the uplink's link is down",
            reply4(),
            est(request4()),
            iface_flags=(("up1", abi.F_IFACE_LINK_DOWN),),
            verdict=TC_ACT_OK,
            redirect=None,
            output=None,
            after=None,
            counters={("vm1", C.HOP_DOWN): 1},
        ),
        False,
    ),
    (
        reply_row(
            "a hop moved (fail-over): the general path follows it",
            reply4(),
            est(request4()),
            settings=abi.F_SET_HOPS_MOVED,
            iface_flags=(("up1", abi.F_IFACE_FOLLOW_MOVES),),
            moved=(("up1", MAC_FW_B, MAC_FW_C),),
            output=bridged(reply4(), MAC_FW_C),
            after=(est(request4(), mac=MAC_FW_C, replies=1, seen="now"),),
            counters={("vm1", C.REDIRECTED): 1, ("vm1", C.HOP_FOLLOWED): 1},
        ),
        False,
    ),
    (refresh_row("v4 ACK of an established connection", request4(), est(request4())), True),
    (refresh_row("v6 ACK of an established connection", request6(), est(request6())), True),
    (
        refresh_row(
            "a request from another MAC: relearned by the general path",
            eth(MAC_FW_C, MAC_VM_1) / request4()[IP],
            est(request4()),
            after=(est(request4(), mac=MAC_FW_C, packets=4, seen="now"),),
            counters={("up1", C.RELEARNED): 1},
        ),
        False,
    ),
    (
        refresh_row(
            "a tagged request: the general path compares the tags",
            eth(MAC_FW_B, MAC_VM_1, (dot1q(),)) / request4()[IP],
            est(request4()),
            after=(est(request4(), vlans=(tci(VLAN_C),), packets=4, seen="now"),),
            counters={("up1", C.RELEARNED): 1},
        ),
        False,
    ),
    (
        refresh_row(
            "a broadcast frame is no request",
            eth(MAC_FW_B, MAC_BROADCAST) / request4()[IP],
            est(request4()),
            after=None,
            counters={("up1", C.NOT_UNICAST): 1},
        ),
        False,
    ),
    (
        refresh_row(
            "sync on: the general path reports the refresh",
            request4(),
            est(request4()),
            settings=abi.F_SET_SYNC,
        ),
        False,
    ),
    (
        refresh_row(
            "a connection a VM holds: the general path sends it there",
            request4(),
            est(request4(), vm="vm1"),
            vm_macs=VM_MACS,
            verdict=TC_ACT_REDIRECT,
            redirect="vm1",
            output=eth(MAC_FW_B, MAC_VM_1) / request4()[IP],
            counters={("up1", C.REFRESHED): 1, ("up1", C.SVC_PINNED): 1},
        ),
        False,
    ),
    (
        refresh_row(
            "v4 UDP datagram of a confirmed stream",
            udp_request(4),
            est(udp_request(4), state=abi.State.UDP_STREAM),
        ),
        True,
    ),
    (
        refresh_row(
            "v6 UDP datagram of a confirmed stream",
            udp_request(6),
            est(udp_request(6), state=abi.State.UDP_STREAM),
        ),
        True,
    ),
    (
        refresh_row(
            "a UDP datagram after the answer: the general path confirms the stream",
            udp_request(4),
            est(udp_request(4), state=abi.State.UDP_ANSWERED, table=PENDING),
            after=(est(udp_request(4), state=abi.State.UDP_STREAM, packets=4, seen="now"),),
            counters={("up1", C.REFRESHED): 1, ("up1", C.CONFIRMED): 1},
            table_counters={
                abi.TableCounter.STATE_CHANGES: 1,
                abi.TableCounter.CONFIRMED_INSERTED: 1,
                abi.TableCounter.PENDING_PROMOTED: 1,
            },
        ),
        False,
    ),
    (
        refresh_row(
            "a UDP datagram with a length past its datagram: the general path counts it",
            eth(MAC_FW_B, MAC_VM_1)
            / IP(src=IP_CLIENT_B, dst=IP_VM_1)
            / UDP(sport=PORT_CLIENT, dport=PORT_HTTP, len=40)
            / b"query",
            est(udp_request(4), state=abi.State.UDP_STREAM),
            after=None,
            counters={("up1", C.MALFORMED): 1},
        ),
        False,
    ),
    (
        to_vm_row(
            "a connection whose VM answered: the fast path sends it to that VM",
            request4(),
            est(request4(), vm="vm1", flags=VM_FAST_HOP),
        ),
        True,
    ),
    (
        to_vm_row(
            "a UDP stream whose VM answered: the fast path sends it to that VM",
            udp_request(4),
            est(udp_request(4), state=abi.State.UDP_STREAM, vm="vm1", flags=VM_FAST_HOP),
        ),
        True,
    ),
    (
        refresh_row(
            "the VM's shortcut, but the frame is for another MAC: the general path forgets it",
            eth(MAC_FW_B, MAC_VM_2) / request4()[IP],
            est(request4(), vm="vm1", flags=VM_FAST_HOP),
            settings=abi.F_SET_FAST_PATH,
            vm_macs=VM_MACS,
            after=(est(request4(), packets=4, seen="now"),),
        ),
        False,
    ),
    (
        refresh_row(
            "the VM's shortcut with the fast path off: the general path forgets it",
            request4(),
            est(request4(), vm="vm1", flags=VM_FAST_HOP),
            vm_macs=VM_MACS,
            after=(est(request4(), packets=4, seen="now"),),
        ),
        False,
    ),
    (
        refresh_row(
            "a FIN from the client: its state moves",
            request4("FA"),
            est(request4()),
            after=(
                est(
                    request4(),
                    packets=4,
                    seen="now",
                    state=abi.State.TCP_CLOSING,
                    flags=abi.F_ENTRY_HOP_KNOWN | abi.F_ENTRY_FIN_OPENER,
                ),
            ),
            table_counters={abi.TableCounter.STATE_CHANGES: 1},
        ),
        False,
    ),
]


@pytest.mark.parametrize(("case", "fast"), ROWS, ids=[c.desc for c, _ in ROWS])
def test_fast_path_rows(dp, case: Case, fast: bool) -> None:  # type: ignore[no-untyped-def]
    """Each row does what it says, and the fast path takes exactly the rows it should."""
    before = fast_taken(dp)
    check(dp, case)
    assert fast_taken(dp) - before == int(fast)


def _outcome(dp: Datapath, case: Case, prog: str) -> tuple[object, ...]:
    """Everything a run of prog on the case's packet shows, from the case's set-up."""
    prepare(dp, case)
    counters, tables = dp.counter_values(), dp.table_counter_values()
    t0 = dp.clock()
    run = dp.run(prog, bytes(case.packet), case.iface, case.gso_size)
    t1 = dp.clock()
    after, tables_after = dp.counter_values(), dp.table_counter_values()
    return (
        run.retval,
        dp.redirected_to(),
        run.data,
        {k: after[k] - counters[k] for k in after if after[k] != counters[k]},
        {k: tables_after[k] - tables[k] for k in tables_after if tables_after[k] != tables[k]},
        dp.table(t0, t1),
        dp.vm_addr_rows(),
        dp.usage_rows(),
        dp.refused_rows(),
    )


def _established(case: Case) -> Case:
    """The case with its guests' MACs known and its TCP entries established:
    the set-up the fast paths look for."""
    setup = tuple(e.but(state=EST, table=CONFIRMED) if _is_tcp(e.key) else e for e in case.setup)
    return replace(
        case,
        desc=case.desc + " [established, MACs known]",
        setup=setup,
        vm_macs=case.vm_macs or VM_MACS,
    )


def _is_tcp(key: Key) -> bool:
    return TCP in key.frame


TABLES = [
    *test_vmport.CASES,
    *test_uplink.ALL,
    *test_conntrack.ALL,
    *test_malformed.CASES,
    *test_failover.CASES,
    *test_scope.CASES,
    *test_vm_untagged.ROWS,
    *(c for c, _ in ROWS),
]
SAME = [c for c in TABLES if c.prog in GENERAL]
SAME += [_established(c) for c in SAME]


def test_the_tables_reach_the_fast_paths(dp) -> None:  # type: ignore[no-untyped-def]
    """The comparison below is worth something only if the fast paths take
    part of its rows: of both programs, a good number."""
    taken = {UPLINK: 0, VMPORT: 0}
    for case in SAME:
        before = fast_taken(dp)
        _outcome(dp, case, case.prog)
        taken[case.prog] += fast_taken(dp) - before
    assert taken[UPLINK] >= 10 and taken[VMPORT] >= 10, taken


@pytest.mark.parametrize("case", SAME, ids=ids(SAME))
def test_fast_path_does_what_the_general_path_does(dp, case: Case) -> None:  # type: ignore[no-untyped-def]
    """lh_uplink / lh_vmport (fast path first) and the general path alone
    leave the same verdict, frame, counters and tables."""
    assert _outcome(dp, case, case.prog) == _outcome(dp, case, GENERAL[case.prog])


# ---------------------------------------------------------------- hops beyond a MAC
#
#   vm1 ── lh_vmport ── fast_reply: entry (established, F_ENTRY_HOP_EXT, id) ── lh_hop_descs[id]
#                         ├─ VXLAN/Geneve: dst MAC := hop MAC, bpf_skb_set_tunnel_key (+ options)
#                         └─ MPLS: dst MAC := hop MAC, labels pushed (TTL := IP TTL), then tags
#                       ── redirect up1
#
# Test run can let a program set a tunnel key but shows no metadata in its
# output: the test build reads the key back (bpf_skb_get_tunnel_key and
# _opt, trace_tunnel in bpf/maps.h) as the reply is redirected. Each row runs
# through lh_vmport (fast path first) and lh_vmport_general from the same
# set-up: the fast path takes exactly the rows marked, and both leave the
# same verdict, frame, key, counters and entry.

HOP_ID = 0x00050006  # any id: the reply reads the one its entry names
ENOENT = 2


class TunnelTrace(ctypes.Structure):
    """struct tunnel_trace (bpf/maps.h, test builds only): keep in sync."""

    _fields_ = [
        ("family", ctypes.c_uint32),
        ("opt_len", ctypes.c_int32),
        ("tunnel_id", ctypes.c_uint32),  # struct bpf_tunnel_key from here
        ("remote", ctypes.c_uint8 * 16),
        ("tos", ctypes.c_uint8),
        ("ttl", ctypes.c_uint8),
        ("ext", ctypes.c_uint16),
        ("label", ctypes.c_uint32),
        ("local", ctypes.c_uint8 * 16),
        ("opts", ctypes.c_uint8 * abi.GENEVE_OPT_MAX),
    ]


@dataclass(frozen=True)
class Tunnel:
    """The key a reply left with, as bpf_skb_get_tunnel_key reads it back: a
    key set for sending has the endpoint as its destination, which the
    helper (reading keys as received) gives as local_ipv4 / local_ipv6."""

    endpoint: str
    vni: int
    ttl: int = 64
    options: bytes = b""  # no options: bpf_skb_get_tunnel_opt says -ENOENT


def tunnel_left(dp: Datapath) -> Tunnel | None:
    m = dp.obj.map("lh_trace_tunnel")
    assert m.info.value_size == ctypes.sizeof(TunnelTrace)
    raw = m.lookup(struct.pack("<I", 0))
    assert raw is not None
    t = TunnelTrace.from_buffer_copy(raw)
    if t.family == 0:
        return None
    if t.family == 4:
        endpoint = str(ipaddress.IPv4Address(int.from_bytes(bytes(t.local)[:4], "little")))
    else:
        endpoint = str(ipaddress.IPv6Address(bytes(t.local)))
    assert t.opt_len == -ENOENT or t.opt_len > 0, t.opt_len
    return Tunnel(endpoint, t.tunnel_id, t.ttl, bytes(t.opts)[: max(t.opt_len, 0)])


def desc6(vni: int = 7) -> abi.HopDesc:
    """A VXLAN hop with an IPv6 endpoint and no options."""
    d = abi.HopDesc(kind=int(abi.HopKind.TUNNEL6), vni=vni)
    ctypes.memmove(d.remote, ipaddress.IPv6Address("fd00:ff00::2").packed, 16)
    return d


GWLB_OPTS = bytes.fromhex(  # three TLVs of class 0x0108 (8, 8, 4 bytes of data): 32 bytes
    "0108 01 02 0001020304050607 0108 02 02 1011121314151617 0108 03 01 20212223"
)


def desc4_geneve() -> abi.HopDesc:
    """A Geneve hop with an IPv4 endpoint and 32 bytes of options."""
    d = test_encap.desc4(endpoint=0xC0000203, vni=9)
    d.opt_len = len(GWLB_OPTS)
    ctypes.memmove(d.opts, GWLB_OPTS, len(GWLB_OPTS))
    return d


def with_tags(d: abi.HopDesc, *tags: int) -> abi.HopDesc:
    """The descriptor with the request's tags (outer first)."""
    out = abi.HopDesc.from_buffer_copy(bytes(d))
    for i, t in enumerate(tags):
        out.vlan_tci[i] = t
    return out


A60, B60 = test_mpls.A60, test_mpls.B60
A64, B33, C33 = lse(MPLS_LABEL_A, 64), lse(MPLS_LABEL_B, 33), lse(MPLS_LABEL_C, 33, 0)
SENT = {C.REDIRECTED: 1, C.ENCAP_REDIRECTED: 1}


@dataclass(frozen=True)
class HopRow:
    desc: str
    request: Packet  # its entry: established, from firewall B on up1, naming HOP_ID
    reply: Packet
    hop: abi.HopDesc | None  # in lh_hop_descs under HOP_ID; None: gone
    output: Packet | None  # None: passed unchanged
    counters: dict[abi.Counter, int]  # vm1's
    fast: bool  # the fast path takes it
    tunnel: Tunnel | None = None  # the key it leaves with
    link: abi.LinkKind = abi.LinkKind.VXLAN  # up1's link kind
    tags: int = 0  # the request's tags (their TCIs in the descriptor); 2: QinQ
    settings: int = 0
    down: tuple[str, ...] = ()  # lh_endpoints_down
    gso_size: int = 0
    routed: bool = False


MPLS = abi.LinkKind.MPLS
HOP_ROWS = [
    HopRow(
        "VXLAN, IPv4 endpoint: the key set, the inner MAC rewritten",
        tcp4_request(), tcp4_reply(), test_encap.desc4(), bridged(tcp4_reply()), SENT, True,
        Tunnel("192.0.2.1", 100),
    ),
    HopRow(
        "VXLAN, IPv6 endpoint",
        tcp6_request(), tcp6_reply(), desc6(), bridged(tcp6_reply()), SENT, True,
        Tunnel("fd00:ff00::2", 7),
    ),
    HopRow(
        "Geneve, IPv6 endpoint and an option: the option set with the key",
        tcp6_request(), tcp6_reply(), test_encap.desc6_geneve(), bridged(tcp6_reply()), SENT,
        True, Tunnel("fd00:ff00::2", 7, options=bytes.fromhex("0108 01 02") + bytes(range(8))),
        link=abi.LinkKind.GENEVE,
    ),
    HopRow(
        "Geneve, IPv4 endpoint and 32 bytes of options (three TLVs)",
        tcp4_request(), tcp4_reply(), desc4_geneve(), bridged(tcp4_reply()), SENT, True,
        Tunnel("192.0.2.3", 9, options=GWLB_OPTS), link=abi.LinkKind.GENEVE,
    ),
    HopRow(
        "VXLAN with an 802.1Q tag inside: the tag pushed (into the skb's metadata)",
        tcp4_request(), tcp4_reply(), with_tags(test_encap.desc4(), tci(VLAN_C)),
        bridged(tcp4_reply()), SENT, True, Tunnel("192.0.2.1", 100), tags=1,
    ),
    HopRow(
        "another endpoint marked down: this reply still takes the fast path",
        tcp4_request(), tcp4_reply(), test_encap.desc4(), bridged(tcp4_reply()), SENT, True,
        Tunnel("192.0.2.1", 100), settings=abi.F_SET_ENDPOINTS_DOWN, down=("192.0.2.2",),
    ),
    HopRow(
        "MPLS, one label over IPv4: pushed, TTL the IP TTL, bottom of stack",
        tcp4_request(), tcp4_reply(), test_mpls.desc(A60),
        labelled(bridged(tcp4_reply()), (A64,)), SENT, True, link=MPLS,
    ),
    HopRow(
        "MPLS, two labels over IPv6 with hop limit 33",
        tcp6_request(), tcp6_reply(hlim=33), test_mpls.desc(A60, B60),
        labelled(bridged(tcp6_reply(hlim=33)), (lse(MPLS_LABEL_A, 33), B33)), SENT, True,
        link=MPLS,
    ),
    HopRow(
        "MPLS, three labels: each TC kept, bottom of stack on the last only",
        tcp6_request(), tcp6_reply(hlim=33), test_mpls.desc(A60, B60, lse(MPLS_LABEL_C, 60, 0)),
        labelled(bridged(tcp6_reply(hlim=33)), (lse(MPLS_LABEL_A, 33), B33, C33)), SENT, True,
        link=MPLS,
    ),
    HopRow(
        "MPLS under QinQ: the labels inside the tags (test run shows the inner tag)",
        tcp4_request(), tcp4_reply(), test_mpls.desc(A60, tags=(tci(VLAN_S), tci(VLAN_C))),
        inner_tag(labelled(bridged(tcp4_reply()), (A64,)), tci(VLAN_C)), SENT, True,
        link=MPLS, tags=2,
    ),
    HopRow(
        "an MPLS descriptor with no label: counted as the general path counts it",
        tcp4_request(), tcp4_reply(), test_mpls.desc(), bridged(tcp4_reply()),
        {C.ENCAP_UNSUPPORTED: 1}, True, link=MPLS,
    ),
    HopRow(
        "the descriptor is gone: the general path passes it, counted",
        tcp4_request(), tcp4_reply(), None, None, {C.HOP_DESC_GONE: 1}, False,
    ),
    HopRow(
        "the endpoint does not answer: the general path passes it, counted",
        tcp4_request(), tcp4_reply(), test_encap.desc4(), None, {C.HOP_UNREACHABLE: 1}, False,
        settings=abi.F_SET_ENDPOINTS_DOWN, down=("192.0.2.1",),
    ),
    HopRow(
        "a GSO reply to an MPLS hop: the general path passes it, counted",
        tcp4_request(), tcp4_reply(), test_mpls.desc(A60), None, {C.MPLS_GSO: 1}, False,
        link=MPLS, gso_size=1400,
    ),
    HopRow(
        "a descriptor of no kind this code pushes: the general path passes it, counted",
        tcp4_request(), tcp4_reply(), abi.HopDesc(kind=7), None, {C.ENCAP_UNSUPPORTED: 1}, False,
    ),
    HopRow(
        "a routed VM port: TTL - 1 first, by the general path; the labels carry it",
        tcp4_request(), tcp4_reply(dst_mac=MAC_VMPORT_1), test_mpls.desc(A60),
        labelled(routed(tcp4_reply(dst_mac=MAC_VMPORT_1)), (lse(MPLS_LABEL_A, 63),)), SENT,
        False, link=MPLS, routed=True,
    ),
    HopRow(
        "a hop moved somewhere (fail-over): the general path looks",
        tcp4_request(), tcp4_reply(), test_encap.desc4(), bridged(tcp4_reply()), SENT, False,
        Tunnel("192.0.2.1", 100), settings=abi.F_SET_HOPS_MOVED,
    ),
]  # fmt: skip


def _empty_hop_maps(maps: tuple[HopSlots, Map]) -> None:
    descs, down = maps
    descs.clear()
    for key in list(down.keys()):
        down.delete(key)


@pytest.fixture
def hop_maps(dp: Datapath) -> Iterator[tuple[HopSlots, Map]]:
    """lh_hop_descs (by id) and lh_endpoints_down, emptied before and after
    (Datapath.reset leaves them)."""
    maps = (HopSlots(dp.obj.map("lh_hop_descs")), dp.obj.map("lh_endpoints_down"))
    _empty_hop_maps(maps)
    yield maps
    _empty_hop_maps(maps)


def _hop_outcome(
    dp: Datapath, maps: tuple[HopSlots, Map], row: HopRow, prog: str
) -> tuple[object, ...]:
    """Everything a run of prog on the row's reply shows, from the row's set-up."""
    descs, down = maps
    dp.reset()
    _empty_hop_maps(maps)
    dp.configure("vm1", flags=abi.F_IFACE_ROUTED if row.routed else 0, vm_mac=MAC_VM_1)
    test_mpls.set_link_kind(dp, "up1", row.link)
    dp.set_settings(row.settings)
    entry = est(row.request, packets=3)
    e = dp.pack_entry(entry)
    e.flags |= abi.F_ENTRY_HOP_EXT | (abi.F_ENTRY_OUTER_8021AD if row.tags == 2 else 0)
    e.vlan_count = row.tags
    e.vlan_tci[0], e.vlan_tci[1] = HOP_ID & 0xFFFF, HOP_ID >> 16
    dp.tables[CONFIRMED].update(entry.key.pack(), bytes(e))
    if row.hop is not None:
        descs.update(struct.pack("<I", HOP_ID), bytes(row.hop))
    for address in row.down:
        down.update(test_encap.endpoint_key(address), b"\x01")
    dp.obj.map("lh_trace_tunnel").update(struct.pack("<I", 0), bytes(TunnelTrace()))
    counters, taken = dp.counter_values(), fast_taken(dp)
    t0 = dp.clock()
    run = dp.run(prog, bytes(row.reply), "vm1", row.gso_size)
    t1 = dp.clock()
    after = dp.counter_values()
    return (
        run.retval,
        dp.redirected_to(),
        run.data.hex(),
        {k: after[k] - counters[k] for k in after if after[k] != counters[k]},
        tunnel_left(dp),
        dp.table(t0, t1),
        fast_taken(dp) - taken,
    )


@pytest.mark.parametrize("row", HOP_ROWS, ids=[r.desc for r in HOP_ROWS])
def test_a_reply_to_a_tunnel_or_mpls_hop(
    dp: Datapath, hop_maps: tuple[HopSlots, Map], row: HopRow
) -> None:
    """The row's reply leaves as it says (verdict, redirect, exact bytes, the
    key read back, vm1's counters), the fast path takes exactly the rows
    marked, and the general path alone leaves the same."""
    verdict, redirect, data, counters, tunnel, table, taken = _hop_outcome(
        dp, hop_maps, row, VMPORT
    )
    sent = C.REDIRECTED in row.counters
    assert verdict == (TC_ACT_REDIRECT if sent else TC_ACT_OK)
    assert redirect == ("up1" if sent else None)
    assert data == bytes(row.reply if row.output is None else row.output).hex()
    assert counters == {("vm1", c): n for c, n in row.counters.items()}
    assert tunnel == row.tunnel
    assert taken == int(row.fast)
    general = _hop_outcome(dp, hop_maps, row, GENERAL[VMPORT])
    assert (verdict, redirect, data, counters, tunnel, table) == general[:6]
    assert general[6] == 0
