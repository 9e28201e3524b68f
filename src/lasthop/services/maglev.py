"""Maglev consistent hashing, as the data path uses it.

The agent builds one lookup table per service (:func:`build_table`): a list
of MAGLEV_SIZE slots, each naming a VM. The data path hashes a new
connection's key with :func:`jhash2` (the kernel's jhash2, mirrored from
bpf/hash.h) and takes the VM in slot ``hash % MAGLEV_SIZE``
(:func:`slot_of`), so the agent and the tests can predict its choice.

Maglev (Eisenbud et al., NSDI 2016): each VM walks its own permutation of
the slots and, in turns, claims the next free slot of its walk until the
table is full. Every VM ends up with an equal share of the slots (a weight-w
VM claims w slots per turn), and removing one of N VMs moves little more
than the 1/N of slots it held. A VM's permutation depends only on its name,
so the same pool gives the same table on every build.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce

from lasthop import abi

__all__ = ["Member", "build_table", "jhash2", "slot_of", "key_words", "MAGLEV_SIZE", "MAGLEV_SEED"]

MAGLEV_SIZE = abi.MAGLEV_SIZE  # keep in sync with bpf/consts.h (a prime)
MAGLEV_SEED = abi.MAGLEV_SEED
JHASH_INITVAL = 0xDEADBEEF
_M32 = 0xFFFFFFFF


def _rol32(word: int, shift: int) -> int:
    return ((word << shift) | (word >> (32 - shift))) & _M32


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    a = (a - c) & _M32
    a ^= _rol32(c, 4)
    c = (c + b) & _M32  # noqa: E702
    b = (b - a) & _M32
    b ^= _rol32(a, 6)
    a = (a + c) & _M32  # noqa: E702
    c = (c - b) & _M32
    c ^= _rol32(b, 8)
    b = (b + a) & _M32  # noqa: E702
    a = (a - c) & _M32
    a ^= _rol32(c, 16)
    c = (c + b) & _M32  # noqa: E702
    b = (b - a) & _M32
    b ^= _rol32(a, 19)
    a = (a + c) & _M32  # noqa: E702
    c = (c - b) & _M32
    c ^= _rol32(b, 4)
    b = (b + a) & _M32  # noqa: E702
    return a, b, c


def _final(a: int, b: int, c: int) -> int:
    c ^= b
    c = (c - _rol32(b, 14)) & _M32  # noqa: E702
    a ^= c
    a = (a - _rol32(c, 11)) & _M32  # noqa: E702
    b ^= a
    b = (b - _rol32(a, 25)) & _M32  # noqa: E702
    c ^= b
    c = (c - _rol32(b, 16)) & _M32  # noqa: E702
    a ^= c
    a = (a - _rol32(c, 4)) & _M32  # noqa: E702
    b ^= a
    b = (b - _rol32(a, 14)) & _M32  # noqa: E702
    c ^= b
    c = (c - _rol32(b, 24)) & _M32  # noqa: E702
    return c


def jhash2(words: Sequence[int], initval: int) -> int:
    """The kernel's jhash2 (include/linux/jhash.h) of 32-bit *words*."""
    length = len(words)
    a = b = c = (JHASH_INITVAL + (length << 2) + initval) & _M32
    i = 0
    while length > 3:
        a = (a + words[i]) & _M32
        b = (b + words[i + 1]) & _M32
        c = (c + words[i + 2]) & _M32
        a, b, c = _mix(a, b, c)
        length -= 3
        i += 3
    if length == 0:
        return c
    if length == 3:
        c = (c + words[i + 2]) & _M32
    if length >= 2:
        b = (b + words[i + 1]) & _M32
    a = (a + words[i]) & _M32
    return _final(a, b, c)


def key_words(key: abi.ConnKey | bytes) -> tuple[int, ...]:
    """A struct conn_key as the data path hashes it: 10 host-order u32 words."""
    raw = bytes(key)
    if len(raw) != 40:
        raise ValueError(f"a conn_key is 40 bytes, not {len(raw)}")
    return struct.unpack("=10I", raw)


def slot_of(key: abi.ConnKey | bytes) -> int:
    """The Maglev slot the data path looks up for a new connection with *key*."""
    return jhash2(key_words(key), MAGLEV_SEED) % MAGLEV_SIZE


@dataclass(frozen=True)
class Member:
    """A VM in a table: *name* fixes its permutation, *value* is what its
    slots hold (the VM port's ifindex), *weight* its share."""

    name: str
    value: int
    weight: int = 1


def _h64(name: str, person: bytes) -> int:
    digest = hashlib.blake2b(name.encode(), digest_size=8, person=person).digest()
    return int.from_bytes(digest, "little")


def _permutation(name: str, size: int) -> tuple[int, int]:
    """(offset, skip) of *name*'s walk over a table of prime *size*."""
    return _h64(name, b"lasthop-offset") % size, _h64(name, b"lasthop-skip") % (size - 1) + 1


def build_table(members: Sequence[Member], size: int = MAGLEV_SIZE) -> list[int]:
    """The Maglev table: *size* slots, each holding a member's value; all 0
    when there is no member. Members with weight 0 get no slot."""
    live = [b for b in members if b.weight > 0]
    if not live:
        return [0] * size
    names = [b.name for b in live]
    if len(set(names)) != len(names):
        raise ValueError("member names must be unique")
    order = sorted(live, key=lambda b: b.name)  # the result must not depend on the caller's order
    divisor = reduce(math.gcd, (b.weight for b in order))
    turns = [b.weight // divisor for b in order]
    walks = [_permutation(b.name, size) for b in order]
    nexts = [w[0] for w in walks]  # the slot each member tries next
    skips = [w[1] for w in walks]
    owner = [-1] * size
    filled = 0
    while True:
        for i, claims in enumerate(turns):
            pos, skip = nexts[i], skips[i]
            for _ in range(claims):
                while owner[pos] >= 0:
                    pos += skip
                    if pos >= size:
                        pos -= size
                owner[pos] = i
                filled += 1
                if filled == size:
                    return [order[o].value for o in owner]
                pos += skip
                if pos >= size:
                    pos -= size
            nexts[i] = pos
