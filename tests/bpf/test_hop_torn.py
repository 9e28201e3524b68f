"""encap.h's hop_desc_copy: a reply never sends a half-written or reused slot.

    vm1 ── lh_vmport ── entry {hop id} ── hop_desc_of: the slot's gen is the id's, kind set
                          │
                          ├─ (test build: hop_torn_hook changes the slot here, once --
                          │   what the expiry's sweep and a learning CPU can do)
                          ▼
                        encap_reply ── hop_desc_copy: gen, the content copied, gen again
                          ├─ unchanged: the tunnel key / labels / tags from the copy ──▶ up1
                          └─ changed: hop_desc_gone, nothing of the hop set ──▶ passes

Between the reply's check of its slot and its reads of the content, the
expiry's sweep may free the slot (content cleared, generation + 2) and a
learning CPU may claim it for another hop (generation odd while it writes,
+ 4 when done). The test build's hook (lh_test_torn) makes exactly that
change at that point, so each row is deterministic: the reply must pass
counted `hop_desc_gone`, never leave with the other hop's endpoint or
labels. The last test builds the object without the second read of the
generation (LH_BROKEN_HOP_RECHECK) and shows the rows catching it: the
reply then leaves with the other hop's key and labels.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Iterator
from dataclasses import dataclass, replace

import pytest

from lasthop import abi
from lasthop.libbpf import BpfObject, Map
from packets import MPLS_LABEL_B, MPLS_LABEL_C, labelled, lse, tcp4_reply, tcp4_request

from . import test_encap, test_mpls
from .harness import TC_ACT_OK, TC_ACT_REDIRECT, VMPORT, Datapath, HopSlots, Iface, bridged
from .test_fastpath import (
    GENERAL,
    HopRow,
    Tunnel,
    _hop_outcome,
    desc4_geneve,
)

C = abi.Counter
MPLS = abi.LinkKind.MPLS


class Torn(ctypes.Structure):
    """struct torn_test (bpf/maps.h, test builds only): keep in sync."""

    _fields_ = [
        ("mode", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
        ("with_", abi.HopDesc),
    ]


class Mode:
    """enum lh_torn_mode (bpf/consts.h, test builds only)."""

    OFF, SWEPT, CLAIMED, WRITING = 0, 1, 2, 3


@dataclass(frozen=True)
class TornRow:
    desc: str
    hop: HopRow  # the reply and its hop, as the fast path's rows have them
    mode: int
    other: abi.HopDesc = abi.HopDesc()  # what CLAIMED / WRITING write into the slot


def _gone(desc: str, hop: abi.HopDesc, link: abi.LinkKind = abi.LinkKind.VXLAN) -> HopRow:
    """The reply passes, its destination MAC already the hop's (written before
    the hop, as on any failure after the check), counted hop_desc_gone."""
    return HopRow(
        desc, tcp4_request(), tcp4_reply(), hop, bridged(tcp4_reply()), {C.HOP_DESC_GONE: 1},
        True, link=link,
    )  # fmt: skip


OTHER4 = test_encap.desc4(endpoint=0xC0000263, vni=200)  # 192.0.2.99, VNI 200: another hop
OTHER_GENEVE = test_encap.desc4(endpoint=0xC0000263, vni=200)
OTHER_GENEVE.opt_len = 8
ctypes.memmove(OTHER_GENEVE.opts, bytes.fromhex("0108 09 01 a1a2a3a4"), 8)
OTHER_MPLS = test_mpls.desc(lse(MPLS_LABEL_C, 60), lse(MPLS_LABEL_B, 60))
VXLAN4 = _gone("VXLAN", test_encap.desc4())
GENEVE = _gone("Geneve, 32 bytes of options", desc4_geneve(), abi.LinkKind.GENEVE)
MPLS2 = _gone("MPLS, two labels", test_mpls.desc(test_mpls.A60, test_mpls.B60), MPLS)

ROWS = [
    TornRow("VXLAN: the slot claimed for another endpoint meanwhile", VXLAN4, Mode.CLAIMED, OTHER4),
    TornRow("VXLAN: the slot swept meanwhile (cleared)", VXLAN4, Mode.SWEPT),
    TornRow("VXLAN: another hop being written into it (odd)", VXLAN4, Mode.WRITING, OTHER4),
    TornRow("Geneve: claimed for another endpoint and option", GENEVE, Mode.CLAIMED, OTHER_GENEVE),
    TornRow("MPLS: the slot claimed for another stack meanwhile", MPLS2, Mode.CLAIMED, OTHER_MPLS),
    TornRow("MPLS: the slot swept meanwhile (cleared)", MPLS2, Mode.SWEPT),
    TornRow("MPLS: another stack being written into it (odd)", MPLS2, Mode.WRITING, OTHER_MPLS),
]


def _torn_map(dp: Datapath) -> Map:
    m = dp.obj.map("lh_test_torn")
    assert m.info.value_size == ctypes.sizeof(Torn)
    return m


def _arm(dp: Datapath, mode: int, other: abi.HopDesc) -> None:
    _torn_map(dp).update(struct.pack("<I", 0), bytes(Torn(mode=mode, with_=other)))


def _armed(dp: Datapath) -> int:
    raw = _torn_map(dp).lookup(struct.pack("<I", 0))
    assert raw is not None
    return Torn.from_buffer_copy(raw).mode


def _hop_maps(dp: Datapath) -> tuple[HopSlots, Map]:
    return HopSlots(dp.obj.map("lh_hop_descs")), dp.obj.map("lh_endpoints_down")


def _torn_outcome(dp: Datapath, row: TornRow, prog: str) -> tuple[object, ...]:
    """_hop_outcome of the row's reply with the hook armed; the hook must have fired."""
    maps = _hop_maps(dp)
    try:
        _arm(dp, row.mode, row.other)
        out = _hop_outcome(dp, maps, row.hop, prog)
        assert _armed(dp) == Mode.OFF, "the hook did not fire: the row tested nothing"
        return out
    finally:
        _arm(dp, Mode.OFF, abi.HopDesc())
        maps[0].clear()


@pytest.fixture
def torn_dp(dp: Datapath) -> Iterator[Datapath]:
    yield dp
    _arm(dp, Mode.OFF, abi.HopDesc())
    _hop_maps(dp)[0].clear()


@pytest.mark.parametrize("row", ROWS, ids=[r.desc for r in ROWS])
@pytest.mark.parametrize("prog", [VMPORT, GENERAL[VMPORT]])
def test_a_slot_changed_between_the_check_and_the_reads_is_gone(
    torn_dp: Datapath, row: TornRow, prog: str
) -> None:
    """The reply (fast path, and the general path alone) passes counted
    hop_desc_gone, with no tunnel key and no labels: the exact verdict,
    bytes and counters."""
    verdict, redirect, data, counters, tunnel, _table, taken = _torn_outcome(torn_dp, row, prog)
    assert verdict == TC_ACT_OK
    assert redirect is None
    assert data == bytes(row.hop.output).hex()  # type: ignore[arg-type]
    assert counters == {("vm1", C.HOP_DESC_GONE): 1}
    assert tunnel is None
    assert taken == (1 if prog == VMPORT else 0)


def test_an_unchanged_slot_is_sent_with_the_hook_off(torn_dp: Datapath) -> None:
    """The control: the same rows' hops, the hook not armed, leave as the
    fast path's rows say (so a gone above is the hook's doing)."""
    row = ROWS[0]
    hop = replace(
        row.hop, output=bridged(tcp4_reply()), counters={C.REDIRECTED: 1, C.ENCAP_REDIRECTED: 1}
    )
    verdict, redirect, _data, counters, tunnel, _table, _taken = _hop_outcome(
        torn_dp, _hop_maps(torn_dp), hop, VMPORT
    )
    assert (verdict, redirect) == (TC_ACT_REDIRECT, "up1")
    assert tunnel == Tunnel("192.0.2.1", 100)
    assert counters == {("vm1", C.REDIRECTED): 1, ("vm1", C.ENCAP_REDIRECTED): 1}


@pytest.fixture(scope="module")
def broken(
    tmp_path_factory: pytest.TempPathFactory, topology: dict[str, Iface], test_netns: object
) -> Iterator[Datapath]:
    """The test object built without hop_desc_copy's second read of the
    generation (LH_BROKEN_HOP_RECHECK), loaded beside the test object."""
    from lasthop import build

    path = build.build(
        tmp_path_factory.mktemp("bpf-broken") / "lasthop-broken.bpf.o",
        defines={"LH_TRACE_REDIRECT": "1", "LH_BROKEN_HOP_RECHECK": "1"},
    )
    obj = BpfObject(path, pin_root=None, programs=[VMPORT, GENERAL[VMPORT], "lh_clock"])
    try:
        yield Datapath(obj, topology)
    finally:
        obj.close()


def test_without_the_recheck_the_rows_catch_the_other_hop(broken: Datapath, test_netns) -> None:  # type: ignore[no-untyped-def]
    """Built without the re-check, a claimed slot's reply leaves with the
    other hop's endpoint, options and labels: what the rows above refuse."""
    test_netns.enter()
    try:
        broken.reset()
        vxlan = _torn_outcome(broken, ROWS[0], VMPORT)
        geneve = _torn_outcome(broken, ROWS[3], VMPORT)
        mpls = _torn_outcome(broken, ROWS[4], GENERAL[VMPORT])
    finally:
        test_netns.leave()
    assert vxlan[0] == TC_ACT_REDIRECT and vxlan[4] == Tunnel("192.0.2.99", 200)
    assert geneve[4] == Tunnel("192.0.2.99", 200, options=bytes.fromhex("0108 09 01 a1a2a3a4"))
    other_labels = (lse(MPLS_LABEL_C, 64), lse(MPLS_LABEL_B, 64))
    assert mpls[0] == TC_ACT_REDIRECT
    assert mpls[2] == bytes(labelled(bridged(tcp4_reply()), other_labels)).hex()
