"""encap.h: last hops beyond a MAC and tags, through BPF_PROG_TEST_RUN.

    up1 (VXLAN, external) ── lh_uplink ──▶ entry {mac, hop id} ──▶ lh_hop_descs[id]
    vm1 ── lh_vmport ── reply: dst MAC := hop MAC, tunnel key := descriptor ──▶ up1

Test run can set a tunnel key on a packet but not give it one, so what a
request carries is tested in the overlay lab (tests/lab/test_overlay_lab.py);
here: the reply path, what a tunnel uplink does with a frame that has no
tunnel metadata, and the expiry pass's sweep of descriptors no entry uses.
The reply's tunnel key is metadata, not bytes: the rows check the verdict,
the redirect, the bytes (only the destination MAC changes) and the counters.
"""

from __future__ import annotations

import ctypes
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from lasthop import abi
from lasthop.datapath import MAP_NAMES, Maps, hop_desc_hash, request_expiry
from lasthop.errors import DatapathError
from packets import MAC_FW_B, tcp4_reply, tcp4_request, tcp6_reply, tcp6_request

from .harness import CONFIRMED, TC_ACT_OK, TC_ACT_REDIRECT, UPLINK, VMPORT, Entry, Key, bridged

C = abi.Counter
HOP_ID = 0x00010002  # any id: the reply reads the one its entry names


def desc4(endpoint: int = 0xC0000201, vni: int = 100) -> abi.HopDesc:
    d = abi.HopDesc(kind=int(abi.HopKind.TUNNEL4), vni=vni)
    d.remote[0] = endpoint  # host order, as bpf_tunnel_key holds it
    return d


def desc6_geneve() -> abi.HopDesc:
    """An IPv6 endpoint with one AWS-GWLB-like option (class 0x0108, 8 bytes of data)."""
    d = abi.HopDesc(kind=int(abi.HopKind.TUNNEL6), vni=7, opt_len=12)
    ctypes.memmove(d.remote, bytes.fromhex("fd00ff00000000000000000000000002"), 16)
    opt = bytes.fromhex("0108 01 02") + bytes(range(8))
    ctypes.memmove(d.opts, opt, len(opt))
    return d


@dataclass(frozen=True)
class Row:
    description: str
    request: object  # the scapy request whose entry the reply finds
    reply: object
    desc: abi.HopDesc | None  # in lh_hop_descs under HOP_ID; None: gone
    verdict: int
    counters: dict[abi.Counter, int] = field(default_factory=dict)
    down: tuple[str, ...] = ()  # lh_endpoints_down: endpoints whose neighbour entry failed
    settings: int = 0  # lh_settings .flags
    slot_gen: int | None = None  # the slot's generation, written over the one HOP_ID names


_HOP_GEN = abi.hop_id_slot(HOP_ID)[1]  # the generation that makes HOP_ID name its slot

ROWS = [
    Row(
        "a reply whose hop is an IPv4 VXLAN endpoint is redirected to its uplink",
        tcp4_request(),
        tcp4_reply(),
        desc4(),
        TC_ACT_REDIRECT,
        {C.REDIRECTED: 1, C.ENCAP_REDIRECTED: 1},
    ),
    Row(
        "a reply whose hop is an IPv6 endpoint with Geneve options is redirected",
        tcp6_request(),
        tcp6_reply(),
        desc6_geneve(),
        TC_ACT_REDIRECT,
        {C.REDIRECTED: 1, C.ENCAP_REDIRECTED: 1},
    ),
    Row(
        "a reply whose descriptor is gone passes unchanged, counted",
        tcp4_request(),
        tcp4_reply(),
        None,
        TC_ACT_OK,
        {C.HOP_DESC_GONE: 1},
    ),
    Row(
        "the slot holds a later generation (hop swept, slot claimed again): gone, passed, counted",
        tcp4_request(),
        tcp4_reply(),
        desc4(),
        TC_ACT_OK,
        {C.HOP_DESC_GONE: 1},
        slot_gen=_HOP_GEN + 2,
    ),
    Row(
        "the slot is being written (generation odd): gone, the reply passes unchanged, counted",
        tcp4_request(),
        tcp4_reply(),
        desc4(),
        TC_ACT_OK,
        {C.HOP_DESC_GONE: 1},
        slot_gen=_HOP_GEN + 1,
    ),
    Row(
        "the slot is free (kind 0) under the id's own generation: gone, passed, counted",
        tcp4_request(),
        tcp4_reply(),
        abi.HopDesc(),
        TC_ACT_OK,
        {C.HOP_DESC_GONE: 1},
    ),
    Row(
        "the hop's IPv4 endpoint does not answer: the reply passes unchanged, counted",
        tcp4_request(),
        tcp4_reply(),
        desc4(),
        TC_ACT_OK,
        {C.HOP_UNREACHABLE: 1},
        down=("192.0.2.1",),
        settings=abi.F_SET_ENDPOINTS_DOWN,
    ),
    Row(
        "the hop's IPv6 endpoint does not answer: the same",
        tcp6_request(),
        tcp6_reply(),
        desc6_geneve(),
        TC_ACT_OK,
        {C.HOP_UNREACHABLE: 1},
        down=("fd00:ff00::2",),
        settings=abi.F_SET_ENDPOINTS_DOWN,
    ),
    Row(
        "another endpoint not answering changes nothing",
        tcp4_request(),
        tcp4_reply(),
        desc4(),
        TC_ACT_REDIRECT,
        {C.REDIRECTED: 1, C.ENCAP_REDIRECTED: 1},
        down=("192.0.2.2", "fd00:ff00::2"),
        settings=abi.F_SET_ENDPOINTS_DOWN,
    ),
    Row(
        "a record while F_SET_ENDPOINTS_DOWN is clear is not looked at",
        tcp4_request(),
        tcp4_reply(),
        desc4(),
        TC_ACT_REDIRECT,
        {C.REDIRECTED: 1, C.ENCAP_REDIRECTED: 1},
        down=("192.0.2.1",),
    ),
]


@pytest.fixture
def endpoints_down(dp) -> Iterator[object]:  # type: ignore[no-untyped-def]
    """lh_endpoints_down, emptied before and after."""
    m = dp.obj.map("lh_endpoints_down")
    for key in list(m.keys()):
        m.delete(key)
    yield m
    for key in list(m.keys()):
        m.delete(key)


def endpoint_key(address: str) -> bytes:
    addr = ipaddress.ip_address(address)
    key = abi.EndpointKey(family=abi.FAMILY_V4 if addr.version == 4 else abi.FAMILY_V6)
    ctypes.memmove(key.addr, addr.packed, len(addr.packed))
    return bytes(key)


def put_tunnel_entry(dp, request: object, hop_id: int = HOP_ID) -> Key:  # type: ignore[no-untyped-def]
    """The entry a request through a tunnel leaves: firewall B's MAC on up1, the hop's id."""
    entry = Entry(Key(request), mac=MAC_FW_B, iface="up1", packets=3)
    e = dp.pack_entry(entry)
    e.flags |= abi.F_ENTRY_HOP_EXT
    e.vlan_tci[0], e.vlan_tci[1] = hop_id & 0xFFFF, hop_id >> 16
    dp.tables[CONFIRMED].update(entry.key.pack(), bytes(e))
    return entry.key


def _u32(n: int) -> bytes:
    return n.to_bytes(4, "little")


@pytest.mark.parametrize("row", ROWS, ids=[r.description for r in ROWS])
def test_reply_through_a_tunnel(dp, descs, endpoints_down, row: Row) -> None:  # type: ignore[no-untyped-def]
    put_tunnel_entry(dp, row.request)
    dp.set_settings(row.settings)
    for address in row.down:
        endpoints_down.update(endpoint_key(address), b"\x01")
    if row.desc is not None:
        descs.update(_u32(HOP_ID), bytes(row.desc))
    if row.slot_gen is not None:
        slot = abi.hop_id_slot(HOP_ID)[0]
        d = descs.slot(slot)
        d.gen = row.slot_gen
        descs.map.update(_u32(slot), bytes(d))
    before = dp.counter_values()
    run = dp.run(VMPORT, bytes(row.reply), "vm1")
    assert run.retval == row.verdict
    redirected = row.verdict == TC_ACT_REDIRECT
    assert dp.redirected_to() == ("up1" if redirected else None)
    assert run.data == bytes(bridged(row.reply) if redirected else row.reply)
    after = dp.counter_values()
    moved = {c: after[(n, c)] - before[(n, c)] for (n, c) in after if n == "vm1"}
    assert {c: v for c, v in moved.items() if v} == row.counters


def test_a_tunnel_uplink_frame_without_metadata_passes_counted(dp, descs) -> None:  # type: ignore[no-untyped-def]
    """On a VXLAN uplink a frame without a tunnel key (not an external device's)
    learns nothing: it passes unchanged, counted encap_unsupported."""
    raw = dp.iface_map.lookup(dp.ifaces["up1"].ifindex.to_bytes(4, "little"))
    cfg = abi.IfaceCfg.from_buffer_copy(raw)
    cfg.link_kind = int(abi.LinkKind.VXLAN)
    dp.iface_map.update(dp.ifaces["up1"].ifindex.to_bytes(4, "little"), bytes(cfg))
    frame = bytes(tcp4_request())
    before = dp.counter_values()
    run = dp.run(UPLINK, frame, "up1")
    assert (run.retval, run.data) == (TC_ACT_OK, frame)
    after = dp.counter_values()
    assert after[("up1", C.ENCAP_UNSUPPORTED)] - before[("up1", C.ENCAP_UNSUPPORTED)] == 1
    assert after[("up1", C.LEARNED)] == before[("up1", C.LEARNED)]
    assert list(descs.keys()) == []
    assert next(dp.conns.map4.keys(), None) is None


def test_the_expiry_pass_sweeps_descriptors_no_entry_names(dp, descs) -> None:  # type: ignore[no-untyped-def]
    """A walk keeps the descriptor a live entry names and removes one no entry
    names: the table holds only hops in use (plus those learned since)."""
    dp.set_settings(0, hz=1000, timeouts={abi.State.NONE: 3600})
    put_tunnel_entry(dp, tcp4_request(), HOP_ID)
    descs.update(_u32(HOP_ID), bytes(desc4()))
    descs.update(_u32(HOP_ID + 1), bytes(desc4(endpoint=0xC0000202)))
    request_expiry(dp.expiry_request)  # written from user space: the pass must look
    assert dp.expire() == 1
    assert [int.from_bytes(k, "little") for k in list(descs.keys())] == [HOP_ID]


def _agent_maps(dp) -> Maps:  # type: ignore[no-untyped-def]
    """The maps as the agent has them, lh_hop_put to store descriptors through."""
    maps = Maps({name: dp.obj.map(name) for name in MAP_NAMES})
    maps.hop_putter = dp.obj.program("lh_hop_put")
    return maps


def test_a_peers_descriptor_is_stored_as_the_data_path_would_store_it(dp, descs) -> None:  # type: ignore[no-untyped-def]
    """The sync's applier (and import) store a peer's descriptor through
    lh_hop_put, as the data path would: the slot its hash names, or the next
    free one when another hop holds that (never over it), claimed (generation
    0 -> 2: the id's generation bits 1); stored again, the same id. It is
    marked in use by the expiry pass to come (hop_desc_pass), so the sweep of
    a pass under way keeps it."""
    maps = _agent_maps(dp)
    want, other = desc4(), desc4(endpoint=0xC0000209)
    base = hop_desc_hash(want) & abi.HOP_SLOT_MASK
    descs.update(_u32(base), bytes(other))  # another hop holds the hash's slot (generation 0)
    hop_id = maps.put_hop_desc(want)
    assert hop_id == abi.hop_id_of((base + 1) & abi.HOP_SLOT_MASK, 2)
    raw = descs.lookup(_u32(hop_id))
    assert raw is not None and maps.hop_desc(hop_id) is not None
    stored = abi.HopDesc.from_buffer_copy(raw)
    assert stored.mark == maps.expiry_stats().passes + 1
    stored.mark, stored.gen = 0, 0
    assert bytes(stored) == bytes(want)
    assert descs.lookup(_u32(base)) == bytes(other)
    assert maps.put_hop_desc(want) == hop_id and len(list(descs.keys())) == 2


def test_a_hop_whose_slots_are_all_taken_is_refused(dp, descs) -> None:  # type: ignore[no-untyped-def]
    """Slot exhaustion: when the HOP_DESC_PROBES slots a new hop may take all
    hold other hops (or are being written), it is refused, hop_desc_full,
    and no slot is touched; one freed, the hop takes it."""
    maps = _agent_maps(dp)
    want = desc4(endpoint=0xC0000233)
    base = hop_desc_hash(want) & abi.HOP_SLOT_MASK
    window = [(base + i) & abi.HOP_SLOT_MASK for i in range(abi.HOP_DESC_PROBES)]
    for i, slot in enumerate(window):
        descs.update(_u32(slot), bytes(desc4(endpoint=0xC0000300 + i)))
    half = descs.slot(window[-1])
    half.gen = 1  # the last one being written: neither free nor this hop
    descs.map.update(_u32(window[-1]), bytes(half))
    before = {s: bytes(descs.slot(s)) for s in window}
    with pytest.raises(DatapathError, match="hop_desc_full"):
        maps.put_hop_desc(want)
    assert {s: bytes(descs.slot(s)) for s in window} == before
    descs.delete(_u32(window[1]))  # freed as a sweep frees it: generation 0 -> 2
    hop_id = maps.put_hop_desc(want)
    assert hop_id == abi.hop_id_of(window[1], 4)
    assert maps.hop_desc(hop_id) is not None and maps.hop_desc(abi.hop_id_of(window[1], 0)) is None


def test_lh_hop_put_refuses_a_frame_that_is_no_descriptor(dp, descs) -> None:  # type: ignore[no-untyped-def]
    """A kind the data path does not store (0, or unknown) is refused with a
    clear error; nothing is stored."""
    maps = _agent_maps(dp)
    for kind in (0, 9):
        with pytest.raises(DatapathError, match=rf"not a hop descriptor \(kind {kind}\)"):
            maps.put_hop_desc(abi.HopDesc(kind=kind))
    assert list(descs.keys()) == []
