"""datapath's readers of the pinned maps that need no kernel: what they make of
the bytes a map gives them (a fake map stands in for the kernel's)."""

from __future__ import annotations

from collections.abc import Iterator

from lasthop import abi
from lasthop.datapath import hops_in_use

SLOT = (5).to_bytes(4, "little")


def _desc(remote: int, vni: int, gen: int, mark: int = 0) -> bytes:
    d = abi.HopDesc(kind=abi.HopKind.TUNNEL4, vni=vni, gen=gen, mark=mark)
    d.remote[0] = remote
    return bytes(d)


class _Slots:
    """A map whose batch read returned *batch* and whose later lookups of the
    slot return *lookups* in turn (the slot as the writers leave it)."""

    def __init__(self, batch: bytes, lookups: list[bytes | None]) -> None:
        self.batch, self.lookups = batch, lookups

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        yield SLOT, self.batch

    def lookup(self, key: bytes) -> bytes | None:
        assert key == SLOT
        return self.lookups.pop(0)


def _read(slots: _Slots) -> list[tuple[int, int, int]]:
    return [(hop_id, d.remote[0], d.vni) for hop_id, d in hops_in_use(slots)]  # type: ignore[arg-type]


def test_a_settled_slot_is_read_once_more_and_kept() -> None:
    a = _desc(0x0A000001, 100, gen=4)
    assert _read(_Slots(a, [_desc(0x0A000001, 100, gen=4, mark=7)])) == [
        (abi.hop_id_of(5, 4), 0x0A000001, 100)
    ]


def test_a_copy_that_mixed_two_hops_is_not_taken_for_either() -> None:
    # the batch copied the old endpoint and the new VNI under the generation it
    # read before the write began: the second copy, the new hop, differs
    torn = _desc(0x0A000001, 200, gen=4)
    new = _desc(0x0A000002, 200, gen=6)
    assert _read(_Slots(torn, [new, new])) == [(abi.hop_id_of(5, 6), 0x0A000002, 200)]


def test_a_slot_that_keeps_changing_or_goes_is_left_out() -> None:
    moving: list[bytes | None] = [_desc(0x0A000000 + i, 100, gen=2 * i) for i in range(2, 8)]
    assert _read(_Slots(_desc(0x0A000001, 100, gen=2), moving)) == []
    assert _read(_Slots(_desc(0x0A000001, 100, gen=2), [None])) == []


def test_a_slot_being_written_or_empty_is_not_read_again() -> None:
    assert _read(_Slots(_desc(0x0A000001, 100, gen=5), [])) == []
    assert _read(_Slots(bytes(abi.HopDesc()), [])) == []
