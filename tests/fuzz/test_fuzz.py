"""The differential fuzzer in CI: a fixed seed, 20,000 frames per program,
no case may disagree with docs/datapath.md's rules -- and a build with one
bounds check flipped must be caught.

    frame (generated, mutated)  ──▶ lh_uplink / lh_vmport (BPF_PROG_TEST_RUN)
              │                              │ verdict, redirect, bytes,
              ▼                              ▼ counters, the whole table
    oracle (scapy + the doc's rules) ──── compared, field by field
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from . import frames
from .runner import PROGRAMS, UPLINK, VMPORT, Fuzzer, Result, sandbox

SEED = 13
CI_CASES = 20_000

# what every CI run must reach, or the generators have lost a class
OUTCOMES = {
    UPLINK: {"learned", "malformed", "fragment_early", "not_ip", "icmp_other", "icmp_error_miss",
             "not_unicast", "rst_unknown"},
    VMPORT: {"redirected", "icmp_error_redirected", "icmp_error_miss", "malformed",
             "fragment_early", "not_ip", "icmp_other", "miss", "vm_origin_spoofed"},
}  # fmt: skip


@pytest.fixture(scope="module")
def ports() -> Iterator[tuple[int, int]]:
    with sandbox() as pair:
        yield pair


def _fuzzer(obj: Path, ports: tuple[int, int]) -> Iterator[Fuzzer]:
    f = Fuzzer(obj, *ports)
    try:
        yield f
    finally:
        f.close()


# both objects are built as the session starts (conftest.BACKGROUND)
@pytest.fixture(scope="module")
def fuzzer(ports: tuple[int, int], background: Callable[[str], Path]) -> Iterator[Fuzzer]:
    yield from _fuzzer(background("fuzz_object"), ports)


@pytest.fixture(scope="module")
def broken(ports: tuple[int, int], background: Callable[[str], Path]) -> Iterator[Fuzzer]:
    yield from _fuzzer(background("broken_object"), ports)


def _failure(result: Result) -> str:
    return "\n".join([result.summary(), *(d.report() for d in result.discrepancies[:5])])


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.parametrize("program", PROGRAMS)
def test_programs_keep_the_documented_rules(fuzzer: Fuzzer, program: str) -> None:
    """20,000 generated and mutated frames per program: verdict, redirect,
    output bytes, counters and the whole table as the oracle says, every one."""
    result = fuzzer.run(program, SEED, CI_CASES)
    print(result.summary())
    assert result.found == 0, _failure(result)
    assert result.cases == CI_CASES
    assert OUTCOMES[program] <= set(result.outcomes), result.summary()


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.netns
@pytest.mark.parametrize("program", PROGRAMS)
def test_a_flipped_bounds_check_is_caught(broken: Fuzzer, program: str) -> None:
    """The object built with in_datagram()'s bound dropped (headers may lie in
    the Ethernet padding) disagrees with the oracle within the CI run's cases."""
    result = broken.run(program, SEED, CI_CASES, stop_at_first=True)
    assert result.found, result.summary()
    print(result.discrepancies[0].report())


def test_a_case_is_made_again_from_its_seed() -> None:
    """Seed, program and case number alone make the same frame; others differ."""
    a = frames.sample(SEED, VMPORT, 12345)
    frames.base.cache_clear()
    assert frames.sample(SEED, VMPORT, 12345) == a
    assert frames.sample(SEED + 1, VMPORT, 12345).data != a.data
    assert frames.sample(SEED, UPLINK, 12345).data != a.data


def test_mutations_change_the_frame() -> None:
    """Of each PER_BASE cases, the first is the generated frame, the others mutate it."""
    for case in range(200):
        s = frames.sample(SEED, UPLINK, case)
        if case % frames.PER_BASE == 0:
            assert s.data == s.base and s.mutation == "valid"
        elif s.mutation != "valid":
            assert s.data != s.base, s.mutation


def test_the_oracle_agrees_with_the_hand_written_malformed_rows() -> None:
    """The oracle, like the C, is checked against the rows someone wrote by
    hand (bpf/test_malformed.py): each frame, on either program, counts
    exactly the reasons its row names."""
    from bpf.test_malformed import BASES, ROWS, SHORT_L3

    from . import oracle

    up, vm = oracle.Port(2, 1, 0), oracle.Port(3, 2, 0)
    for row in ROWS + SHORT_L3:
        for base in row.bases:
            request, reply, _ = BASES[base]
            for frame, port in ((bytes(row.make(request)), up), (bytes(row.make(reply)), vm)):
                reading = oracle.read(frame, False)
                if port is up:
                    want = oracle.uplink(frame, reading, up)
                else:
                    want = oracle.vmport(frame, reading, vm, up, None, b"\0" * 6)
                got = {c for (_, c) in want.counters}
                assert got == set(row.counters), f"{row.desc} [{base}]: {got}"
