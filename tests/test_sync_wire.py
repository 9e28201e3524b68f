"""lasthop.sync.wire: a change record travels with interface names and the
time it has left, and comes back as the same key and entry (no root needed)."""

from __future__ import annotations

import ctypes

from lasthop import abi
from lasthop.sync.wire import WIRE_FIELDS, decode_record, encode_record, last_seen_for, left_ms

HZ = 250


def _record(kind: abi.ChangeKind, last_seen: int) -> bytes:
    key = abi.ConnKey(sport=0x1234, dport=0x5000, proto=abi.IPPROTO_TCP, family=abi.FAMILY_V4)
    key.saddr[0], key.daddr[0] = 0x0100000A, 0x0200000A
    entry = abi.ConnEntry(last_seen=last_seen, ifindex=7, vm_ifindex=9, seq=42, packets=3)
    entry.state, entry.flags, entry.vlan_count = abi.State.TCP_ESTABLISHED, 1, 1
    entry.vlan_tci[0] = 100
    ctypes.memmove(entry.mac, bytes.fromhex("02fa0000000b"), abi.ETH_ALEN)
    return bytes(abi.ConnChange(kind=kind, table=abi.ChangeTable.CONFIRMED, key=key, entry=entry))


def _settings() -> abi.Settings:
    s = abi.Settings(hz=HZ)
    s.timeout[abi.State.TCP_ESTABLISHED] = 100
    return s


def test_a_record_round_trips_with_names_and_time_left() -> None:
    """Encoded at jiffies now (10 s after last_seen) and decoded, a record keeps
    its key and entry; ifindexes travel as names; 90 s of 100 are left."""
    names = {7: "fw0", 9: "vm0"}
    values = encode_record(
        _record(abi.ChangeKind.PROMOTED, 1000), names.__getitem__, 1000 + 10 * HZ, _settings()
    )
    assert len(values) == len(WIRE_FIELDS)
    c = decode_record(values)
    assert (c.kind, c.table, c.uplink, c.vm_port, c.left_ms) == (
        abi.ChangeKind.PROMOTED, abi.ChangeTable.CONFIRMED, "fw0", "vm0", 90_000,
    )  # fmt: skip
    original = abi.ConnChange.from_buffer_copy(_record(abi.ChangeKind.PROMOTED, 1000))
    assert bytes(c.key) == bytes(original.key)
    original.entry.last_seen = original.entry.ifindex = original.entry.vm_ifindex = 0
    assert bytes(c.entry) == bytes(original.entry)


def test_a_removal_carries_only_its_key() -> None:
    values = encode_record(_record(abi.ChangeKind.EXPIRED, 0), lambda i: "x", 0, _settings())
    c = decode_record(values)
    assert (c.uplink, c.vm_port, c.left_ms) == ("", "", 0)


def test_the_applier_turns_time_left_into_last_seen_on_its_own_clock() -> None:
    """last_seen = now - (timeout - left), across the 32-bit wrap; never in the future."""
    now = 5  # just after a wrap
    seen = last_seen_for(90_000, now, HZ, 100)
    assert seen == (now - 10 * HZ) % 2**32
    e = abi.ConnEntry(last_seen=seen, state=abi.State.TCP_ESTABLISHED)
    assert left_ms(e, now, HZ, 100) == 90_000
    assert last_seen_for(500_000, now, HZ, 100) == now  # more left than our timeout: fresh
