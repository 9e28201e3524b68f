"""Runs the data-path programs on frames with BPF_PROG_TEST_RUN and checks a
case row: verdict, redirect target, output bytes, counter deltas (per
interface and table-wide), the whole connection table afterwards (every map:
lh_conns4 and lh_conns, confirmed, lh_pending4 and lh_pending, pending; rows
name keys as full conn_keys, datapath.FamilyMap puts an IPv4 one into the
16-byte-keyed map of its family), the VM ports' addresses (lh_vm_addrs)
and their quota use (lh_vm_usage).

Interfaces are named (``up1``, ``vm1``, ...); their ifindexes exist only in
the test's network namespace, so rows name them and the runner resolves.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    IPv6ExtHdrSegmentRouting,
)
from scapy.layers.ipsec import AH
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Packet, Raw

from lasthop import abi
from lasthop.datapath import FamilyMap, hops_in_use, request_expiry, store_hop_desc
from lasthop.libbpf import BpfObject, Map, TestRun
from lasthop.scope import ScopeRule, compile_rules
from packets import MAC_FW_B, MAC_UPLINK_1

# what every data-path test module needs: its marks, and the short names its case tables use
MARKS = [pytest.mark.root, pytest.mark.bpf, pytest.mark.netns]
C = abi.Counter
TC = abi.TableCounter
ST = abi.State
HOP = abi.F_ENTRY_HOP_KNOWN

TC_ACT_OK = 0
TC_ACT_SHOT = 2
TC_ACT_REDIRECT = 7

UPLINK = "lh_uplink"
VMPORT = "lh_vmport"

CONFIRMED = "confirmed"  # Entry.table: lh_conns4 (IPv4) or lh_conns (IPv6)
PENDING = "pending"  # Entry.table: lh_pending4 or lh_pending
EITHER = "either"  # an lh_expiry_due entry the data path filed: whichever table holds it

SLOT0 = "slot0"  # counters of packets on interfaces the agent did not configure
SEEN_SETUP = 1_000_000_007  # last_seen the rows write: "not touched by this run"
_SKB_CTX_SIZE = 192  # struct __sk_buff; ifindex at offset 40
_SKB_IFINDEX_OFF = 40
_SKB_GSO_SIZE_OFF = 176  # a GSO skb, as GRO builds them


@dataclass(frozen=True)
class Iface:
    name: str
    ifindex: int
    mac: str
    role: abi.Role
    slot: int


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def mac_str(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


# ---------------------------------------------------------------- keys


def _l4_ports(frame: Packet) -> tuple[int, int]:
    """Ports as the key holds them; ICMP echo puts its identifier in both."""
    frame = _l4_dissected(frame)
    for layer in (TCP, UDP):
        if layer in frame:
            return frame[layer].sport, frame[layer].dport
    if ICMP in frame and frame[ICMP].type in (0, 8):
        return frame[ICMP].id, frame[ICMP].id
    for layer in (ICMPv6EchoRequest, ICMPv6EchoReply):
        if layer in frame:
            return frame[layer].id, frame[layer].id
    return 0, 0


_SKIPPED_EXT = (
    IPv6ExtHdrFragment,  # a first fragment's: its L4 header follows
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrRouting,
    IPv6ExtHdrSegmentRouting,
    AH,
)


def _l4_layer(frame: Packet) -> tuple[int, Packet]:
    """(protocol, the layer after the IP header and the extension headers lasthop
    skips). The segment routing header is a routing header scapy has a class of
    its own for; after AH scapy leaves the rest undissected."""
    if IP in frame:
        return int(frame[IP].proto), frame[IP].payload
    layer = frame[IPv6]
    nh, payload = layer.nh, layer.payload
    while isinstance(payload, _SKIPPED_EXT):
        nh, payload = payload.nh, payload.payload
    return int(nh), payload


_L4_CLASS = {6: TCP, 17: UDP}


def _l4_dissected(frame: Packet) -> Packet:
    """The frame itself, or its L4 header dissected where scapy left raw bytes."""
    proto, payload = _l4_layer(frame)
    if isinstance(payload, Raw) and proto in _L4_CLASS:
        return _L4_CLASS[proto](bytes(payload))  # type: ignore[no-any-return]
    return frame


def _l4_proto(frame: Packet) -> int:
    return _l4_layer(frame)[0]


@dataclass(frozen=True)
class Key:
    """A connection key, from a frame of the connection. Keys are oriented as
    the request arrives on an uplink; a frame the VM sends is reversed."""

    frame: Packet
    reverse: bool = False
    zone: int = 0

    def pack(self) -> bytes:
        frame = Ether(bytes(self.frame))  # dissected: every field has its built value
        if IP in frame:
            family, src, dst = abi.FAMILY_V4, frame[IP].src, frame[IP].dst
            pad = 12
            src_b, dst_b = socket.inet_aton(src) + bytes(pad), socket.inet_aton(dst) + bytes(pad)
        else:
            family = abi.FAMILY_V6
            src_b = socket.inet_pton(socket.AF_INET6, frame[IPv6].src)
            dst_b = socket.inet_pton(socket.AF_INET6, frame[IPv6].dst)
        sport, dport = _l4_ports(frame)
        if self.reverse:
            src_b, dst_b, sport, dport = dst_b, src_b, dport, sport
        return struct.pack(
            "<16s16s2s2sBBH",
            src_b,
            dst_b,
            sport.to_bytes(2, "big"),
            dport.to_bytes(2, "big"),
            _l4_proto(frame),
            family,
            self.zone,
        )

    def describe(self) -> str:
        k = abi.ConnKey.from_buffer_copy(self.pack())
        return f"proto {k.proto} fam {k.family} zone {k.zone} {self.pack()[:32].hex()}"


# ---------------------------------------------------------------- entries


@dataclass(frozen=True)
class Entry:
    """A connection-table row as a case writes or expects it."""

    key: Key
    mac: str = "00:00:00:00:00:00"
    iface: str | None = None  # uplink of the last hop
    vlans: tuple[int, ...] = ()  # TCIs, outer first
    flags: int = abi.F_ENTRY_HOP_KNOWN
    packets: int = 1
    replies: int = 0
    vm: str | None = None  # VM port serving or opening the connection
    seen: str = "setup"  # expected: "setup" (untouched) or "now" (set by this run)
    state: abi.State = abi.State.NONE
    seq: int = 0  # TCP: the ACK number that completes the handshake
    table: str = CONFIRMED  # CONFIRMED (lh_conns) or PENDING (lh_pending)
    flags2: int = 0  # F_ENTRY2_INPLACE: unconfirmed, waiting in the confirmed table

    def but(self, **changes: Any) -> Entry:
        return replace(self, **changes)


@dataclass(frozen=True)
class EntryView:
    """What the table holds, with ifindexes named, for readable diffs."""

    mac: str
    iface: str | None
    vlans: tuple[int, ...]
    flags: int
    packets: int
    replies: int
    vm: str | None
    seen: str
    state: abi.State
    seq: int
    table: str
    flags2: int


# ---------------------------------------------------------------- VM addresses

Usage = tuple[int, int, int]  # lh_vm_usage: created, base, counted
VmAddr = tuple[str, str, abi.VmAddrOrigin]  # (VM port, address, origin)


def addr_bytes(addr: str) -> tuple[int, bytes]:
    """(family, 16 bytes as the maps hold addresses: IPv4 in word 0)."""
    if ":" in addr:
        return abi.FAMILY_V6, socket.inet_pton(socket.AF_INET6, addr)
    return abi.FAMILY_V4, socket.inet_aton(addr) + bytes(12)


def addr_str(family: int, raw: bytes) -> str:
    if family == abi.FAMILY_V4:
        return socket.inet_ntoa(raw[:4])
    return socket.inet_ntop(socket.AF_INET6, raw)


# ---------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One row: set-up, input frame, and everything expected of the run."""

    desc: str
    prog: str  # UPLINK or VMPORT
    iface: str  # interface the frame arrives on
    packet: Packet
    setup: tuple[Entry, ...] = ()
    settings: int = 0  # lh_settings[0].flags
    routed: bool = False  # VM ports carry F_IFACE_ROUTED
    zones: tuple[tuple[str, int], ...] = ()  # (iface, zone) overrides
    roles: tuple[tuple[str, abi.Role], ...] = ()  # (iface, role) overrides; NONE removes
    vm_macs: tuple[tuple[str, str], ...] = ()  # (VM port, guest MAC) known to lh_ifaces
    iface_flags: tuple[tuple[str, int], ...] = ()  # (iface, F_IFACE_* added)
    # lh_vm_addrs: (VM port, address), CONFIGURED, or (VM port, address, origin)
    vm_addrs: tuple[tuple[str, str] | VmAddr, ...] = ()
    vm_quota: int = 0  # lh_settings .vm_quota
    inplace_quota: int = 0  # lh_settings .inplace_quota (with F_SET_INPLACE)
    # lh_inplace's count at set-up; None: the set-up entries with F_ENTRY2_INPLACE
    inplace: int | None = None
    # lh_vm_usage elements: (VM port, (created, base, counted)); a port with none has none
    vm_usage: tuple[tuple[str, Usage], ...] = ()
    gso_size: int = 0  # run as a GSO skb (GRO-merged) with this segment size
    hops: tuple[tuple[str, str], ...] = ()  # lh_hops: (uplink, MAC) listed
    refused: dict[tuple[str, str], int] = field(default_factory=dict)  # lh_hops_refused after
    moved: tuple[tuple[str, str, str], ...] = ()  # lh_hop_moved: (uplink, old MAC, new MAC)
    unreachable: tuple[tuple[str, str], ...] = ()  # lh_hop_moved, HOP_UNREACHABLE: (uplink, MAC)
    scope: tuple[ScopeRule, ...] = ()  # lh_scope: the rules (with F_SET_SCOPE in settings)
    scope_default: str = "learn"  # ... and the default, written after them
    verdict: int = TC_ACT_OK
    redirect: str | None = None  # interface the frame is redirected to
    output: Packet | None = None  # None: the input, unchanged
    counters: dict[tuple[str, abi.Counter], int] = field(default_factory=dict)
    table_counters: dict[abi.TableCounter, int] = field(default_factory=dict)
    after: tuple[Entry, ...] | None = None  # None: the set-up entries, unchanged
    vm_addrs_after: tuple[VmAddr, ...] | None = None  # None: vm_addrs, unchanged
    vm_usage_after: tuple[tuple[str, Usage], ...] | None = None  # None: vm_usage, unchanged

    def __str__(self) -> str:
        return self.desc


def ids(cases: list[Case]) -> list[str]:
    return [c.desc for c in cases]


# ---------------------------------------------------------------- expected frames


def bridged(frame: Packet, dst: str = MAC_FW_B) -> Packet:
    """A bridged reply as it leaves: only the destination MAC changed."""
    out = Ether(bytes(frame))
    out.dst = dst
    return out


def routed(frame: Packet, src: str = MAC_UPLINK_1, dst: str = MAC_FW_B) -> Packet:
    """A routed reply: both MACs, TTL or hop limit - 1, IPv4 checksum as scapy computes it."""
    out = Ether(bytes(frame))
    out.src, out.dst = src, dst
    if IP in out:
        out[IP].ttl -= 1
        del out[IP].chksum
    else:
        out[IPv6].hlim -= 1
    return Ether(bytes(out))


def inner_tag(frame: Packet, tag: int) -> Packet:
    """The frame with one 802.1Q tag after the MACs: what test run shows of a QinQ push."""
    out = Ether(bytes(frame))
    return (
        Ether(src=out.src, dst=out.dst)
        / Dot1Q(prio=tag >> 13, dei=tag >> 12 & 1, vlan=tag & 0xFFF)
        / out.payload
    )


# ---------------------------------------------------------------- the runner


class Datapath:
    """The test object loaded once; reset() gives each case a fresh state."""

    def __init__(self, obj: BpfObject, ifaces: dict[str, Iface]) -> None:
        self.obj = obj
        self.ifaces = ifaces
        self.by_index = {i.ifindex: i.name for i in ifaces.values()}
        self.conns = FamilyMap.of(obj.map, abi.ChangeTable.CONFIRMED)
        self.pending = FamilyMap.of(obj.map, abi.ChangeTable.PENDING)
        self.tables = {CONFIRMED: self.conns, PENDING: self.pending}
        self.iface_map: Map = obj.map("lh_ifaces")
        self.counters: Map = obj.map("lh_counters")
        self.table_counters_map: Map = obj.map("lh_table_counters")
        self.settings: Map = obj.map("lh_settings")
        self.expiry: Map = obj.map("lh_expiry")
        self.expiry_request: Map = obj.map("lh_expiry_request")
        self.expiry_due: Map = obj.map("lh_expiry_due")
        self.vm_addrs: Map = obj.map("lh_vm_addrs")
        self.vm_usage: Map = obj.map("lh_vm_usage")
        self.hops: Map = obj.map("lh_hops")
        self.hops_refused: Map = obj.map("lh_hops_refused")
        self.hop_moved: Map = obj.map("lh_hop_moved")
        self.scope: Map = obj.map("lh_scope")
        self.trace: Map = obj.map("lh_trace")
        self.frags: Map = obj.map("lh_frags")
        self.inplace: Map = obj.map("lh_inplace")
        self.slots = {SLOT0: 0} | {i.name: i.slot for i in ifaces.values() if i.slot}

    # set-up
    def reset(self) -> None:
        for m in (
            self.conns.map4, self.conns.map6, self.pending.map4, self.pending.map6,
            self.vm_addrs, self.vm_usage, self.hops, self.hops_refused, self.hop_moved,
            self.frags, self.expiry_due,
        ):  # fmt: skip
            for key in list(m.keys()):
                m.delete(key)
        for iface in self.ifaces.values():
            self.configure(iface.name)
        self.set_settings(0)
        self.set_inplace(0)
        self.scope.update(_u32(0), bytes(abi.ScopeRule()))  # no rule: the list ends at once
        self.expiry.update(_u32(0), bytes(abi.ExpiryStats()))
        self.trace.update(_u32(0), _u32(0))

    def configure(
        self,
        name: str,
        *,
        role: abi.Role | None = None,
        zone: int = 0,
        flags: int = 0,
        vm_mac: str | None = None,
        delivery: abi.Delivery = abi.Delivery.DEVICE,
    ) -> None:
        iface = self.ifaces[name]
        role = iface.role if role is None else role
        cfg = abi.IfaceCfg(
            role=int(role), zone=zone, flags=flags, slot=iface.slot, delivery=int(delivery)
        )
        ctypes.memmove(cfg.mac, mac_bytes(iface.mac), abi.ETH_ALEN)
        if vm_mac:
            ctypes.memmove(cfg.vm_mac, mac_bytes(vm_mac), abi.ETH_ALEN)
            cfg.flags |= abi.F_IFACE_VM_MAC
        if role == abi.Role.NONE:
            cfg = abi.IfaceCfg()
        self.iface_map.update(_u32(iface.ifindex), bytes(cfg))

    def set_settings(
        self,
        flags: int,
        *,
        hz: int = 0,
        timeouts: dict[abi.State, int] | None = None,
        vm_quota: int = 0,
        sync_shift: int = 0,
        inplace_quota: int = 0,
    ) -> None:
        if inplace_quota:
            flags |= abi.F_SET_INPLACE
        s = abi.Settings(
            flags=flags, hz=hz, vm_quota=vm_quota, sync_shift=sync_shift,
            inplace_quota=inplace_quota,
        )  # fmt: skip
        for state, seconds in (timeouts or {}).items():
            s.timeout[state] = seconds
        self.settings.update(_u32(0), bytes(s))

    def set_inplace(self, count: int) -> None:
        """lh_inplace's count of in-place entries."""
        self.inplace.update(_u32(0), bytes(abi.InplaceCount(count=count)))

    def inplace_count(self) -> int:
        raw = self.inplace.lookup(_u32(0))
        assert raw is not None
        return abi.InplaceCount.from_buffer_copy(raw).count

    def put(self, entry: Entry, last_seen: int = SEEN_SETUP) -> None:
        """Writes entry into the table it names (lh_conns or lh_pending)."""
        e = self.pack_entry(entry, last_seen)
        self.tables[entry.table].update(entry.key.pack(), bytes(e))
        request_expiry(self.expiry_request)  # as every writer from user space must

    def pack_entry(self, entry: Entry, last_seen: int = SEEN_SETUP) -> abi.ConnEntry:
        """The conn_entry a row's entry stands for, ifindexes resolved."""
        e = abi.ConnEntry(
            last_seen=last_seen,
            flags=entry.flags,
            packets=entry.packets,
            replies=entry.replies,
            vlan_count=len(entry.vlans),
            state=int(entry.state),
            seq=entry.seq,
            flags2=entry.flags2,
        )
        ctypes.memmove(e.mac, mac_bytes(entry.mac), abi.ETH_ALEN)
        e.ifindex = self.ifaces[entry.iface].ifindex if entry.iface else 0
        e.vm_ifindex = self.ifaces[entry.vm].ifindex if entry.vm else 0
        for i, t in enumerate(entry.vlans):
            e.vlan_tci[i] = t
        return e

    def add_vm_addr(
        self, vm: str, addr: str, origin: abi.VmAddrOrigin = abi.VmAddrOrigin.CONFIGURED
    ) -> None:
        family, raw = addr_bytes(addr)
        key = struct.pack("<II16s", self.ifaces[vm].ifindex, family, raw)
        self.vm_addrs.update(key, bytes(abi.VmAddr(origin=int(origin))))

    def list_hop(self, iface: str, mac: str) -> None:
        """An uplink's allow_last_hops/deny_last_hops entry (lh_hops)."""
        key = abi.hop_key(self.ifaces[iface].ifindex, mac_bytes(mac))
        self.hops.update(bytes(key), b"\x01")

    def set_scope(self, rules: tuple[ScopeRule, ...], default: str = "learn") -> None:
        """lh_scope as the agent writes it: the rules (uplinks by name), the default, an end."""
        compiled = compile_rules(rules, default, lambda name: self.ifaces[name].ifindex)  # type: ignore[arg-type]
        for n, rule in enumerate([*compiled, abi.ScopeRule()]):
            self.scope.update(_u32(n), bytes(rule))

    def move_hop(self, iface: str, old: str, new: str) -> None:
        """A fail-over record (lh_hop_moved): uplink *iface*'s last hop *old* is now *new*."""
        key = abi.hop_key(self.ifaces[iface].ifindex, mac_bytes(old))
        self.hop_moved.update(bytes(key), bytes(abi.hop_moved(mac_bytes(new))))

    def unreachable_hop(self, iface: str, mac: str) -> None:
        """A record that uplink *iface*'s last hop *mac* does not answer (HOP_UNREACHABLE)."""
        key = abi.hop_key(self.ifaces[iface].ifindex, mac_bytes(mac))
        value = abi.hop_moved(mac_bytes(mac), abi.HOP_UNREACHABLE)
        self.hop_moved.update(bytes(key), bytes(value))

    def moved_rows(self, unreachable: bool = False) -> set[tuple[str, ...]]:
        """lh_hop_moved: (uplink, old MAC, new MAC) of its moves, or (uplink,
        MAC) of its unreachable hops."""
        out: set[tuple[str, ...]] = set()
        for raw_key, raw in self.hop_moved.items():
            key = abi.HopKey.from_buffer_copy(raw_key)
            new = abi.HopMoved.from_buffer_copy(raw[: ctypes.sizeof(abi.HopMoved)])
            if bool(new.flags & abi.HOP_UNREACHABLE) != unreachable:
                continue
            row = (self.by_index[key.ifindex], mac_str(bytes(key.mac)))
            out.add(row if unreachable else (*row, mac_str(bytes(new.mac))))
        return out

    def refused_rows(self) -> dict[tuple[str, str], int]:
        """lh_hops_refused: (uplink, MAC) -> frames refused."""
        out = {}
        for raw_key, raw in self.hops_refused.items():
            key = abi.HopKey.from_buffer_copy(raw_key)
            out[(self.by_index[key.ifindex], mac_str(bytes(key.mac)))] = int.from_bytes(
                raw[:8], "little"
            )
        return out

    def set_usage(self, vm: str, usage: Usage) -> None:
        created, base, counted = usage
        value = abi.VmUsage(created=created, base=base, counted=counted)
        self.vm_usage.update(_u32(self.ifaces[vm].ifindex), bytes(value))

    # running
    def run(self, prog: str, frame: bytes, iface: str, gso_size: int = 0) -> TestRun:
        ctx = bytearray(_SKB_CTX_SIZE)
        struct.pack_into("<I", ctx, _SKB_IFINDEX_OFF, self.ifaces[iface].ifindex)
        struct.pack_into("<I", ctx, _SKB_GSO_SIZE_OFF, gso_size)
        return self.obj.program(prog).test_run(frame, ctx=bytes(ctx))

    def clock(self) -> int:
        """The data path's clock: low 32 bits of jiffies, as lh_clock returns them."""
        return self.obj.program("lh_clock").test_run(bytes(14)).retval % 2**32

    def expire(self) -> int:
        """One expiry pass (lh_expire); returns its verdict (1: walked)."""
        return self.obj.program("lh_expire").test_run(bytes(14)).retval

    def expiry_stats(self) -> abi.ExpiryStats:
        raw = self.expiry.lookup(_u32(0))
        assert raw is not None
        return abi.ExpiryStats.from_buffer_copy(raw[: ctypes.sizeof(abi.ExpiryStats)])

    def expiry_index(self) -> dict[bytes, tuple[int, str]]:
        """lh_expiry_due: full conn_key -> (deadline, the table that held it;
        EITHER: filed by the data path, which does not say)."""
        out = {}
        tables = {int(abi.ChangeTable.CONFIRMED): CONFIRMED, int(abi.ChangeTable.PENDING): PENDING}
        for raw_key, raw in self.expiry_due.items():
            d = abi.ExpiryDue.from_buffer_copy(raw[: ctypes.sizeof(abi.ExpiryDue)])
            out[bytes(raw_key)] = (d.deadline, tables.get(d.table, EITHER))
        return out

    def redirected_to(self) -> str | None:
        raw = self.trace.lookup(_u32(0))
        ifindex = struct.unpack("<I", raw[:4])[0] if raw else 0
        return self.by_index.get(ifindex, str(ifindex)) if ifindex else None

    # reading
    def counter_values(self) -> dict[tuple[str, abi.Counter], int]:
        out = {}
        for name, slot in self.slots.items():
            for c in abi.Counter:
                raw = self.counters.lookup(abi.counter_key(slot, c))
                assert raw is not None
                out[(name, c)] = _percpu_sum(self.counters, raw)
        return out

    def table_counter_values(self) -> dict[abi.TableCounter, int]:
        out = {}
        for c in abi.TableCounter:
            raw = self.table_counters_map.lookup(_u32(int(c)))
            assert raw is not None
            out[c] = _percpu_sum(self.table_counters_map, raw)
        return out

    def vm_addr_rows(self) -> set[VmAddr]:
        """lh_vm_addrs as (VM port, address, origin)."""
        out = set()
        for key, raw in self.vm_addrs.items():
            ifindex, family, addr = struct.unpack("<II16s", key)
            origin = abi.VmAddr.from_buffer_copy(raw[: ctypes.sizeof(abi.VmAddr)]).origin
            out.add(
                (
                    self.by_index.get(ifindex, str(ifindex)),
                    addr_str(family, addr),
                    abi.VmAddrOrigin(origin),
                )
            )
        return out

    def usage(self, vm: str) -> abi.VmUsage:
        raw = self.vm_usage.lookup(_u32(self.ifaces[vm].ifindex))
        assert raw is not None, f"no lh_vm_usage element for {vm}"
        return abi.VmUsage.from_buffer_copy(raw[: ctypes.sizeof(abi.VmUsage)])

    def usage_rows(self) -> dict[str, Usage]:
        """(created, base, counted) of every VM port lh_vm_usage has an element for."""
        out = {}
        for key, raw in self.vm_usage.items():
            ifindex = struct.unpack("<I", key)[0]
            u = abi.VmUsage.from_buffer_copy(raw[: ctypes.sizeof(abi.VmUsage)])
            out[self.by_index.get(ifindex, str(ifindex))] = (u.created, u.base, u.counted)
        return out

    def table(self, t0: int = 0, t1: int = 0) -> dict[bytes, EntryView]:
        """Both tables, by key; an entry says which table holds it."""
        out: dict[bytes, EntryView] = {}
        for table, m in self.tables.items():
            for key, raw in m.items():
                e = abi.ConnEntry.from_buffer_copy(raw[: ctypes.sizeof(abi.ConnEntry)])
                if e.last_seen == SEEN_SETUP:
                    seen = "setup"
                elif (e.last_seen - t0) % 2**32 <= (t1 - t0) % 2**32:
                    seen = "now"
                else:
                    seen = f"last_seen={e.last_seen} outside [{t0}, {t1}]"
                assert key not in out, f"key in both tables: {key.hex()}"
                out[key] = EntryView(
                    mac=mac_str(bytes(e.mac)),
                    iface=self.by_index.get(e.ifindex, str(e.ifindex)) if e.ifindex else None,
                    vlans=tuple(e.vlan_tci[i] for i in range(e.vlan_count)),
                    flags=e.flags,
                    packets=e.packets,
                    replies=e.replies,
                    vm=self.by_index.get(e.vm_ifindex, str(e.vm_ifindex)) if e.vm_ifindex else None,
                    seen=seen,
                    state=_state(e.state),
                    seq=e.seq,
                    table=table,
                    flags2=e.flags2,
                )
        return out


class HopSlots:
    """lh_hop_descs (an array of slots) seen by hop id, as the tests write
    and read it: update(id) stores a descriptor in the slot the id names with
    the generation that makes the id name it (datapath.store_hop_desc),
    lookup(id) reads it back while the id still names it, keys() lists the
    ids of the slots in use, delete(id) frees the slot (its generation moves
    on, as the sweep's does)."""

    def __init__(self, m: Map) -> None:
        self.map = m

    def update(self, key: bytes, value: bytes) -> None:
        store_hop_desc(self.map, int.from_bytes(key, "little"), abi.HopDesc.from_buffer_copy(value))

    def slot(self, slot: int) -> abi.HopDesc:
        return abi.HopDesc.from_buffer_copy(self.map.lookup(_u32(slot)) or bytes(88))

    def lookup(self, key: bytes) -> bytes | None:
        hop_id = int.from_bytes(key, "little")
        d = self.slot(hop_id & abi.HOP_SLOT_MASK)
        return bytes(d) if d.kind and abi.hop_id_names(hop_id, d.gen) else None

    def keys(self) -> list[bytes]:
        return [_u32(hop_id) for hop_id, _ in hops_in_use(self.map)]

    def delete(self, key: bytes) -> None:
        slot, _ = abi.hop_id_slot(int.from_bytes(key, "little"))
        freed = abi.HopDesc(gen=self.slot(slot).gen + 2)
        self.map.update(_u32(slot), bytes(freed))

    def clear(self) -> None:
        """Every slot zero, generations too (a fresh map's)."""
        for k, raw in self.map.items():
            if any(raw):
                self.map.update(k, bytes(len(raw)))


def _state(value: int) -> abi.State:
    try:
        return abi.State(value)
    except ValueError:
        return value  # type: ignore[return-value]  # shown as the bare number in a diff


def _percpu_sum(m: Map, raw: bytes) -> int:
    return sum(struct.unpack("<Q", v[:8])[0] for v in m.percpu_values(raw))


def _u32(n: int) -> bytes:
    return struct.pack("<I", n)


def view(entry: Entry) -> EntryView:
    return EntryView(
        mac=entry.mac,
        iface=entry.iface,
        vlans=entry.vlans,
        flags=entry.flags,
        packets=entry.packets,
        replies=entry.replies,
        vm=entry.vm,
        seen=entry.seen,
        state=entry.state,
        seq=entry.seq,
        table=entry.table,
        flags2=entry.flags2,
    )


def _inplace(entries: tuple[Entry, ...]) -> int:
    """How many of *entries* wait in place (F_ENTRY2_INPLACE)."""
    return sum(1 for e in entries if e.flags2 & abi.F_ENTRY2_INPLACE)


def dp_inplace_before(case: Case) -> int:
    """lh_inplace's count as a case sets it up."""
    return _inplace(case.setup) if case.inplace is None else case.inplace


def frame_diff(actual: bytes, expected: bytes) -> str:
    def show(raw: bytes) -> str:
        return str(Ether(raw).show2(dump=True))

    return (
        f"\n--- got ({len(actual)} bytes)\n{show(actual)}"
        f"\n--- expected ({len(expected)} bytes)\n{show(expected)}"
    )


def prepare(dp: Datapath, case: Case) -> None:
    """Resets the data path and writes a case's set-up (interfaces, settings,
    entries, addresses, quotas, lists, moves, scope)."""
    dp.reset()
    zones, roles, vm_macs = dict(case.zones), dict(case.roles), dict(case.vm_macs)
    extra = dict(case.iface_flags)
    for name, iface in dp.ifaces.items():
        role = roles.get(name, iface.role)
        flags = abi.F_IFACE_ROUTED if case.routed and role == abi.Role.VM_PORT else 0
        dp.configure(
            name,
            role=role,
            zone=zones.get(name, 0),
            flags=flags | extra.get(name, 0),
            vm_mac=vm_macs.get(name),
        )
    dp.set_settings(case.settings, vm_quota=case.vm_quota, inplace_quota=case.inplace_quota)
    for entry in case.setup:
        dp.put(entry)
    dp.set_inplace(_inplace(case.setup) if case.inplace is None else case.inplace)
    for row in case.vm_addrs:
        dp.add_vm_addr(*row)
    for vm, usage in case.vm_usage:
        dp.set_usage(vm, usage)
    for iface, mac in case.hops:
        dp.list_hop(iface, mac)
    for row in case.moved:
        dp.move_hop(*row)
    for iface, mac in case.unreachable:
        dp.unreachable_hop(iface, mac)
    if case.scope or case.scope_default != "learn":
        dp.set_scope(case.scope, case.scope_default)


def check(dp: Datapath, case: Case, extra: Callable[[Datapath], None] | None = None) -> TestRun:
    """Runs one case on a freshly reset data path and asserts every expectation
    (*extra*: more set-up, after the case's own)."""
    prepare(dp, case)
    if extra is not None:
        extra(dp)
    frame = bytes(case.packet)
    before, tables_before = dp.counter_values(), dp.table_counter_values()
    t0 = dp.clock()
    run = dp.run(case.prog, frame, case.iface, case.gso_size)
    t1 = dp.clock()
    after, tables_after = dp.counter_values(), dp.table_counter_values()

    assert run.retval == case.verdict, f"verdict {run.retval}, expected {case.verdict}"
    assert dp.redirected_to() == case.redirect
    expected = frame if case.output is None else bytes(case.output)
    assert run.data == expected, frame_diff(run.data, expected)
    deltas = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    assert deltas == case.counters
    table_deltas = {
        k: tables_after[k] - tables_before[k]
        for k in tables_after
        if tables_after[k] != tables_before[k]
    }
    assert table_deltas == case.table_counters
    want = case.setup if case.after is None else case.after
    assert dp.table(t0, t1) == {e.key.pack(): view(e) for e in want}
    # the count moves exactly as in-place entries come and go
    assert dp.inplace_count() == dp_inplace_before(case) + _inplace(want) - _inplace(case.setup)
    want_addrs = (
        case.vm_addrs_after
        if case.vm_addrs_after is not None
        else tuple((*row, abi.VmAddrOrigin.CONFIGURED)[:3] for row in case.vm_addrs)
    )
    assert dp.vm_addr_rows() == set(want_addrs)
    assert dp.usage_rows() == dict(
        case.vm_usage if case.vm_usage_after is None else case.vm_usage_after
    )
    assert dp.refused_rows() == case.refused
    assert dp.moved_rows() == set(case.moved)  # the data path only reads it
    assert dp.moved_rows(unreachable=True) == set(case.unreachable)
    return run


__all__ = [
    "CONFIRMED",
    "PENDING",
    "Case",
    "Datapath",
    "Entry",
    "EntryView",
    "Iface",
    "Key",
    "SEEN_SETUP",
    "SLOT0",
    "Usage",
    "VmAddr",
    "addr_bytes",
    "TC_ACT_OK",
    "TC_ACT_REDIRECT",
    "TC_ACT_SHOT",
    "UPLINK",
    "VMPORT",
    "bridged",
    "check",
    "inner_tag",
    "prepare",
    "routed",
    "ids",
    "mac_bytes",
]
