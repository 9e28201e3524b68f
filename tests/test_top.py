"""`lasthop top`'s view (lasthop.top) from counters given here: rates from
two reads, uplinks and VM ports from the per-interface counters, last hops
from the sample, and only the counters that moved; it reads one stats and at
most SAMPLE entries per refresh, however large the table. The live view
under a pseudo-terminal, next to a real agent, is in tests/agent/test_top_live.py."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
from rich.console import Console

from lasthop import top
from lasthop.connections import Connection
from lasthop.controller import Stats, TableStats


def _table(inserted: int, expired: int, states: dict[str, int], evicted: int = 0) -> TableStats:
    return TableStats(sum(states.values()), 1000, inserted, expired, 0, evicted, states)


def _stats(learned: int, expired: int, redirected: int) -> Stats:
    return Stats(
        totals={"learned": learned, "redirected": redirected, "miss": 4},
        interfaces={
            "up0": {"learned": learned - 10, "miss": 4},
            "up1": {"learned": 10},
            "vm0": {"redirected": redirected},
        },
        confirmed=_table(learned, expired, {"tcp_established": 7}),
        pending=_table(0, 0, {"tcp_syn": 2}),
        promoted=0,
        confirm_refused=0,
        expiry_passes=1,
        expiry_skipped=0,
        last_pass_age_s=0.5,
        next_due_s=1.0,
    )


def _conn(mac: str, uplink: str) -> Connection:
    return Connection(
        proto="tcp", family=4, src="10.1.1.2", dst="10.0.0.11", sport=1, dport=7, zone=0,
        mac=mac, uplink=uplink, uplink_ifindex=2, vlan=[], age_s=0.0, packets=1, replies=1,
        vm_port="vm0", state="tcp_established",
    )  # fmt: skip


def test_rates_come_from_two_reads_and_only_moved_counters_are_listed() -> None:
    """learned and expired per second are the counters' differences over the
    interval; a counter that did not move (miss) is not listed."""
    f = top.frame(_stats(100, 5, 50), _stats(140, 9, 90), 2.0, [])
    assert f.rates["learned"] == 20 and f.rates["expired"] == 2 and f.rates["redirected"] == 20
    assert ("learned", "up0", 40, 130) in f.moved and ("redirected", "vm0", 40, 90) in f.moved
    assert not any(counter == "miss" for counter, *_ in f.moved)
    assert f.uplinks[0][:2] == ("up0", 130) and f.uplinks[0][2] == 20
    assert f.states == {"tcp_established": (7, 0), "tcp_syn": (0, 2)}


def test_last_hops_are_shares_of_the_sample_scaled_to_the_table() -> None:
    sample = [_conn("02:00:00:f0:00:02", "up0")] * 3 + [_conn("02:00:00:f0:00:01", "up1")]
    f = top.frame(None, _stats(100, 5, 50), 1.0, sample)
    assert f.last_hops[0] == ("02:00:00:f0:00:02", "up0", 3) and f.sampled == 4
    console = Console(record=True, width=150)
    console.print(top.render(f, "lasthop top"))
    text = console.export_text()
    assert "top last hops (sample of 4 of 9 entries)" in text
    assert "75%" in text and "~7" in text  # 3/4 of the 9 entries
    assert "tcp_established" in text and "learned" in text


class Huge:
    """A table of a million entries: stats is one read, the entries an endless stream."""

    def __init__(self) -> None:
        self.read = 0
        self.stats_calls = 0

    def stats(self) -> Stats:
        self.stats_calls += 1
        return _stats(10**6, 0, 0)

    def iter_connections(self) -> Iterator[Connection]:
        for _ in itertools.count():
            self.read += 1
            yield _conn("02:00:00:f0:00:02", "up0")


def test_a_refresh_reads_one_stats_and_a_bounded_sample() -> None:
    """At 1,000,000 entries a refresh reads one stats and SAMPLE entries, not the table."""
    source = Huge()
    console = Console(record=True, width=150)
    top.run(source, title="t", interval=0.1, sample=top.SAMPLE, count=2, console=console)
    assert source.stats_calls == 2
    assert source.read <= 2 * top.SAMPLE


def test_macs_and_names_are_shown_as_they_are() -> None:
    """A MAC holding ':cd:' (rich's emoji code for a disc) and an interface
    name that looks like markup are printed verbatim, whatever the console."""
    sample = [_conn("32:e2:3d:cd:65:17", "[bold]up0")]
    f = top.frame(None, _stats(100, 5, 50), 1.0, sample)
    console = Console(record=True, width=150)  # rich's defaults: emoji and markup on
    console.print(top.render(f, "lasthop top"))
    text = console.export_text()
    assert "32:e2:3d:cd:65:17" in text and "[bold]up0" in text


def test_the_live_view_draws_no_emoji(capsys: pytest.CaptureFixture[str]) -> None:
    """run with no console given (as the CLI calls it) prints ':cd:' as text."""

    class Disc(Huge):
        def iter_connections(self) -> Iterator[Connection]:
            yield _conn("32:e2:3d:cd:65:17", "up0")

    top.run(Disc(), title="t", interval=0.01, sample=10, count=1)
    assert "32:e2:3d:cd:65:17" in capsys.readouterr().out
