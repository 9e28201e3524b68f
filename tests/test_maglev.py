"""lasthop.services.maglev: the jhash2 mirror agrees with bpf/hash.h, and the tables
are balanced, honour weights, and move little when the pool changes."""

from __future__ import annotations

import collections
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from lasthop import abi
from lasthop.services.maglev import Member, build_table, jhash2, key_words, slot_of

BPF_DIR = Path(__file__).resolve().parents[1] / "src" / "lasthop" / "bpf"

# A host program that runs bpf/hash.h itself: reads 10 words per line, prints jhash2_10.
HASH_MAIN = r"""
#include <stdio.h>
#include "hash.h"
int main(void)
{
	__u32 k[10], seed;
	while (scanf("%u", &seed) == 1) {
		for (int i = 0; i < 10; i++)
			if (scanf("%u", &k[i]) != 1)
				return 1;
		printf("%u\n", jhash2_10(k, seed));
	}
	return 0;
}
"""


@pytest.fixture(scope="module")
def c_jhash(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("cc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler to build bpf/hash.h for the host")
    folder = tmp_path_factory.mktemp("jhash")
    (folder / "main.c").write_text(HASH_MAIN)
    exe = folder / "jhash"
    subprocess.run(
        [cc, "-O1", "-I", str(BPF_DIR), str(folder / "main.c"), "-o", str(exe)],
        check=True,
        capture_output=True,
    )
    return exe


def test_jhash2_matches_the_data_path_header(c_jhash: Path) -> None:
    """jhash2 over 10 words gives what bpf/hash.h's jhash2_10 gives, for any words and seed."""
    rng = random.Random(7)
    rows = [[abi.MAGLEV_SEED] + [0] * 10, [0] + [0xFFFFFFFF] * 10]
    rows += [[rng.getrandbits(32) for _ in range(11)] for _ in range(500)]
    out = subprocess.run(
        [str(c_jhash)],
        input="\n".join(" ".join(map(str, r)) for r in rows),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert [jhash2(r[1:], r[0]) for r in rows] == [int(x) for x in out]


def test_jhash2_other_lengths_follow_the_kernel_tail() -> None:
    """Lengths that are not a multiple of 3 take the kernel's tail; 0 words skip the final mix."""
    assert jhash2([], 0) == 0xDEADBEEF
    assert len({jhash2([1] * n, 0) for n in range(1, 8)}) == 7


def test_slot_of_hashes_the_struct_bytes() -> None:
    """A key's slot is jhash2 of its 40 bytes read as host-order words, mod the table size."""
    key = abi.ConnKey(sport=0x1234, dport=0x5000, proto=6, family=4, zone=3)
    key.saddr[0], key.daddr[0] = 0x0100000A, 0x0200000A
    assert len(key_words(key)) == 10
    assert slot_of(key) == jhash2(key_words(key), abi.MAGLEV_SEED) % abi.MAGLEV_SIZE
    with pytest.raises(ValueError):
        key_words(b"short")


def _members(n: int) -> list[Member]:
    return [Member(f"vm{i}", 100 + i) for i in range(n)]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64])
def test_equal_weights_give_equal_shares_of_slots(n: int) -> None:
    """Every slot is filled, and no VM holds more than one slot above another."""
    counts = collections.Counter(build_table(_members(n)))
    assert sum(counts.values()) == abi.MAGLEV_SIZE
    assert set(counts) == {100 + i for i in range(n)}
    assert max(counts.values()) - min(counts.values()) <= 1


def test_weights_are_honoured() -> None:
    """A weight-3 VM holds three times the slots of a weight-1 VM (to a slot)."""
    pool = [Member("a", 1, 1), Member("b", 2, 3), Member("c", 3, 2)]
    counts = collections.Counter(build_table(pool))
    unit = abi.MAGLEV_SIZE / 6
    for value, weight in ((1, 1), (2, 3), (3, 2)):
        assert abs(counts[value] - weight * unit) <= weight


def test_the_table_depends_on_names_not_on_order() -> None:
    """The same pool, listed in any order, gives the same table."""
    pool = _members(5)
    assert build_table(pool) == build_table(list(reversed(pool)))


def test_no_member_means_all_zero() -> None:
    """An empty pool (or only weight 0) gives a table of zeros: 'no VM'."""
    assert set(build_table([])) == {0}
    assert set(build_table([Member("a", 1, 0)])) == {0}


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(ValueError):
        build_table([Member("a", 1), Member("a", 2)])


@pytest.mark.parametrize("n", [3, 8, 32])
def test_removing_one_vm_moves_little_more_than_its_share(n: int) -> None:
    """Slots of the remaining VMs mostly stay: the change is within 1/N + 1 %."""
    pool = _members(n)
    before = build_table(pool)
    after = build_table(pool[1:])
    changed = sum(1 for a, b in zip(before, after, strict=True) if a != b)
    assert changed / abi.MAGLEV_SIZE <= 1 / n + 0.01
    # nothing moves onto the removed VM, and all of its slots moved
    assert pool[0].value not in after


def test_adding_a_vm_takes_slots_only_for_itself() -> None:
    """A slot that changes owner when a VM joins goes to that VM (mostly)."""
    pool = _members(4)
    before = build_table(pool)
    after = build_table([*pool, Member("vm-new", 999)])
    moved = [b for a, b in zip(before, after, strict=True) if a != b]
    assert sum(1 for b in moved if b == 999) / len(moved) > 0.97


def test_the_bench_hashes_keys_as_the_mirror_does() -> None:
    """bench services' vectorised jhash2 agrees with jhash2 key for key."""
    np = pytest.importorskip("numpy")
    from lasthop.bench.services import _jhash2_numpy

    rng = random.Random(3)
    rows = [[rng.getrandbits(32) for _ in range(10)] for _ in range(300)]
    got = _jhash2_numpy(np.asarray(rows, dtype=np.uint32), abi.MAGLEV_SEED)
    assert [int(x) for x in got] == [jhash2(r, abi.MAGLEV_SEED) for r in rows]


def test_the_bench_figures_for_a_small_run() -> None:
    """Spread and movement as bench services computes them, on 30,000 keys."""
    from lasthop.bench.services import simulated_slots, spread

    s = spread(3, simulated_slots(30_000))
    assert s.busiest < 1.05 and s.quietest > 0.95
    assert 0.30 < s.moved <= s.moved_bound
    assert (s.slots_min, s.slots_max) == (21845, 21846)
