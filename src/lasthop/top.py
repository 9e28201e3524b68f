"""`lasthop top`: a live terminal view of the table (rich's Live display),
refreshed each second, as cheap at 1,000,000 entries as at ten.

Each refresh reads what the kernel keeps (one Controller.stats(): the counter
slots, the tables' element counts and event counters, the states the last
expiry pass found) and a bounded sample of the table for the last hops:

- connections by state, per table (the last expiry pass's counts);
- learned, expired, promoted, evicted per second (kernel event counters);
- uplinks by connections learned, and VM ports by replies redirected (the
  per-interface counter slots: exact, and free);
- top last hops: the first SAMPLE entries the kernel hands back (one batch
  read, at most 4096 entries whatever the table's size); a hash table returns
  them in bucket order, which its random hash seed makes a fair sample. Shares
  are of the sample, counts scaled to the table (estimates, marked ~);
- the counters that moved since the last refresh, per interface.

Nothing here walks the table; rich is imported here, when `top` runs.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Iterable
from contextlib import closing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from lasthop.connections import Connection

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from lasthop.controller import Stats

__all__ = ["Frame", "frame", "read", "render", "run", "SAMPLE", "TOP"]

SAMPLE = 1000  # entries read per refresh for the last hops (a bounded sample)
TOP = 5  # rows in the uplink and last-hop tables


class Source(Protocol):
    """What top reads: the controller."""

    def stats(self) -> Stats: ...

    def iter_connections(self) -> Iterable[Connection]: ...


@dataclass(frozen=True)
class Frame:
    """One refresh of the view, computed from two reads of the counters."""

    entries: int
    capacity: int
    states: dict[str, tuple[int, int]]  # state -> (confirmed, pending)
    rates: dict[str, float]  # learned, expired, promoted, evicted, redirected: per second
    uplinks: list[tuple[str, int, float]]  # (interface, learned total, learned/s), busiest first
    vm_ports: list[tuple[str, int, float]]  # (interface, redirected total, redirected/s)
    last_hops: list[tuple[str, str, int]]  # (MAC, uplink, entries in the sample)
    sampled: int  # entries in the sample
    moved: list[tuple[str, str, int, int]] = field(
        default_factory=list
    )  # (counter, iface, +, total)
    last_pass_age_s: float | None = None


def _rate(now: int, before: int, dt: float) -> float:
    return max(0, now - before) / dt if dt > 0 else 0.0


def _events(st: Stats) -> dict[str, int]:
    return {
        "learned": st.totals.get("learned", 0),
        "expired": st.confirmed.expired + st.pending.expired,
        "promoted": st.promoted,
        "evicted": st.pending.evicted,
        "redirected": st.totals.get("redirected", 0),
    }


def _by_counter(st: Stats, counter: str) -> dict[str, int]:
    return {name: c[counter] for name, c in st.interfaces.items() if c.get(counter)}


def _ranked(now: dict[str, int], before: dict[str, int], dt: float) -> list[tuple[str, int, float]]:
    rows = [(name, n, _rate(n, before.get(name, 0), dt)) for name, n in now.items()]
    return sorted(rows, key=lambda r: (-r[2], -r[1], r[0]))[:TOP]


def frame(prev: Stats | None, cur: Stats, dt: float, sample: list[Connection]) -> Frame:
    """The view of *cur*, with rates against *prev* (None: the first read, no rates)."""
    before = prev if prev is not None else cur
    b_events, c_events = _events(before), _events(cur)
    states = {
        s: (cur.confirmed.states.get(s, 0), cur.pending.states.get(s, 0))
        for s in sorted({*cur.confirmed.states, *cur.pending.states})
    }
    hops = Counter((c.mac, c.uplink) for c in sample if c.mac)
    moved = []
    for iface, counts in sorted(cur.interfaces.items()):
        old = before.interfaces.get(iface, {})
        for counter, n in sorted(counts.items()):
            if n != old.get(counter, 0):
                moved.append((counter, iface, n - old.get(counter, 0), n))
    return Frame(
        entries=cur.entries,
        capacity=cur.capacity,
        states=states,
        rates={k: _rate(v, b_events[k], dt) for k, v in c_events.items()},
        uplinks=_ranked(_by_counter(cur, "learned"), _by_counter(before, "learned"), dt),
        vm_ports=_ranked(_by_counter(cur, "redirected"), _by_counter(before, "redirected"), dt),
        last_hops=[(mac, up, n) for (mac, up), n in hops.most_common(TOP)],
        sampled=len(sample),
        moved=moved,
        last_pass_age_s=cur.last_pass_age_s,
    )


def render(f: Frame, title: str) -> RenderableType:
    """The screen of one frame. Names and MACs go in as Text: a string cell
    is markup, where ':cd:' in a MAC became an emoji and '[...]' in an
    interface's name a style."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    age = f"{f.last_pass_age_s:.1f} s ago" if f.last_pass_age_s is not None else "not yet"
    head = Text(
        f"{title}: {f.entries} of {f.capacity} entries; "
        + ", ".join(f"{k} {v:.0f}/s" for k, v in f.rates.items())
        + f"; last expiry pass {age}"
    )

    def table(title: str) -> Table:  # never narrower than its title (rich wraps it otherwise)
        return Table(title=title, title_justify="left", min_width=len(title))

    states = table("connections by state (last expiry pass)")
    for col in ("state", "confirmed", "pending"):
        states.add_column(col, justify="left" if col == "state" else "right")
    for s, (c, p) in f.states.items():
        states.add_row(Text(s), str(c), str(p))
    ifaces = table("uplinks and VM ports (kernel counters)")
    for col in ("interface", "counter", "total", "per s"):
        ifaces.add_column(col, justify="left" if col in ("interface", "counter") else "right")
    for rows, counter in ((f.uplinks, "learned"), (f.vm_ports, "redirected")):
        for name, n, rate in rows:
            ifaces.add_row(Text(name), counter, str(n), f"{rate:.0f}")
    hops = table(f"top last hops (sample of {f.sampled} of {f.entries} entries)")
    for col in ("last-hop MAC", "uplink", "share", "connections"):
        hops.add_column(col, justify="left" if col in ("last-hop MAC", "uplink") else "right")
    for mac, up, n in f.last_hops:
        share = n / f.sampled if f.sampled else 0.0
        hops.add_row(Text(mac), Text(up), f"{share:.0%}", f"~{round(share * f.entries)}")
    moved = table("counters that moved (since the last refresh)")
    for col in ("counter", "interface", "moved", "total"):
        moved.add_column(col, justify="left" if col in ("counter", "interface") else "right")
    for counter, iface, d, n in f.moved:
        moved.add_row(Text(counter), Text(iface), f"{d:+d}", str(n))
    return Group(head, states, ifaces, hops, moved)


def read(source: Source, sample: int = SAMPLE) -> tuple[Stats, list[Connection]]:
    """One refresh's reads: one stats, and at most *sample* entries (the
    batch read of the table's first entries, then closed)."""
    cur = source.stats()
    with closing(iter(source.iter_connections())) as entries:  # type: ignore[type-var]
        return cur, list(itertools.islice(entries, sample))


def run(
    source: Source,
    *,
    title: str,
    interval: float = 1.0,
    sample: int = SAMPLE,
    count: int = 0,
    console: Console | None = None,
) -> None:
    """Refreshes the view every *interval* seconds until Ctrl-C (or *count* refreshes)."""
    from rich.console import Console
    from rich.live import Live

    console = console or Console(emoji=False)  # the head and titles are strings too
    prev: Stats | None = None
    last = time.monotonic()
    with Live(console=console, auto_refresh=False, transient=False) as live:
        for n in itertools.count(1):
            cur, conns = read(source, sample)
            now = time.monotonic()
            live.update(render(frame(prev, cur, now - last, conns), title), refresh=True)
            prev, last = cur, now
            if count and n >= count:
                return
            time.sleep(max(0.0, interval - (time.monotonic() - now)))
